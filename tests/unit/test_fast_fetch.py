"""pipeline.kafka.fast_fetch parses fetched batches into exactly the records kafka-python's own parser
returns (RawRecord form), with the same positions, and kafka-python still takes the hook."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from crc32c import crc32c
from kafka import KafkaConsumer
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
from kafka.structs import TopicPartition

from pipeline.kafka.fast_fetch import FastPartitionRecords, install
from pipeline.records import RawRecord

TP = TopicPartition("topic", 3)
BIG = b"v" * 300  # multi-byte length varints


def _batch(base: int, records: list[tuple[Any, ...]], magic: int = 2, compression: int = 0) -> bytes:
    b = MemoryRecordsBuilder(magic, compression, 10**7, offset=base)
    for ts, key, value, headers in records:
        assert b.append(ts, key, value, headers if magic == 2 else []) is not None
    b.close()
    return bytes(b.buffer())


def _with_attributes(buf: bytes, bits: int) -> bytes:
    """Set attribute bits of a v2 batch (LogAppendTime, control) and fix its CRC."""
    out = bytearray(buf)
    attrs = struct.unpack_from(">h", out, 21)[0] | bits
    struct.pack_into(">h", out, 21, attrs)
    struct.pack_into(">I", out, 17, crc32c(bytes(out[21:])))
    return bytes(out)


RECORDS = [
    (1_700_000_000_000, b"k1", b'{"a":1}', []),
    (1_700_000_000_005, None, b"no key", []),
    (1_700_000_000_001, b"", b"", [("h1", b"x"), ("h2", None)]),  # empty key and value, headers
    (1_700_000_000_009, b"k4", None, []),  # tombstone
    (1_700_000_000_002, b"k" * 200, BIG, [("long-header", b"y" * 200)]),
]


def _stock(buf: bytes, fetch_offset: int = 0, step: int | None = None) -> tuple[list[RawRecord], int]:
    part = Fetcher.PartitionRecords(fetch_offset, TP, MemoryRecords(buf))
    recs = _take_all(part, step)
    return [RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in recs], \
        part.next_fetch_offset


def _fast(buf: bytes, fetch_offset: int = 0, step: int | None = None) -> tuple[list[RawRecord], int]:
    part = FastPartitionRecords(fetch_offset, TP, MemoryRecords(buf))
    return _take_all(part, step), part.next_fetch_offset


def _take_all(part: Any, step: int | None) -> list[Any]:
    out: list[Any] = []
    while part:
        got = part.take(step)
        if not got and step is not None:
            break
        out.extend(got)
        if step is None:
            break
    return out


CASES = {
    "plain": _batch(0, RECORDS),
    "two batches, base offsets": _batch(10, RECORDS[:2]) + _batch(12, RECORDS[2:]),
    "gzip": _batch(0, RECORDS, compression=1),
    "log append time": _with_attributes(_batch(0, RECORDS), 0x08),
    "control batch skipped": _batch(0, RECORDS[:2]) + _with_attributes(_batch(2, RECORDS[:1]), 0x20)
    + _batch(3, RECORDS[2:]),
    "message format v1": _batch(0, RECORDS, magic=1),
    "many records": _batch(0, [(1_700_000_000_000 + i, f"k{i}".encode(), BIG, []) for i in range(300)]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("step", [None, 1, 7])
def test_same_records_and_positions_as_kafka_python(name: str, step: int | None) -> None:
    buf = CASES[name]
    assert _fast(buf, step=step) == _stock(buf, step=step)
    got = _fast(buf, step=step)[0]
    assert got and all(type(r) is RawRecord for r in got)


def test_fetch_offset_inside_a_batch_skips_earlier_records() -> None:
    buf = _batch(100, RECORDS)
    assert _fast(buf, fetch_offset=102) == _stock(buf, fetch_offset=102)
    assert [r.offset for r in _fast(buf, fetch_offset=102)[0]] == [102, 103, 104]


def test_corrupt_batch_is_refused() -> None:
    buf = bytearray(_batch(0, RECORDS))
    buf[-3] ^= 0xFF
    with pytest.raises(CorruptRecordError):
        FastPartitionRecords(0, TP, MemoryRecords(bytes(buf))).take()


def test_installs_on_this_kafka_python() -> None:
    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:9", api_version=(2, 8))
    try:
        assert install(consumer)
        assert consumer._fetcher.PartitionRecords is FastPartitionRecords
    finally:
        consumer.close()
