"""pipeline.kafka.fast_fetch parses fetched batches into exactly the records kafka-python's own parser
returns (RawRecord form), with the same positions, for every codec and control batches; kafka-python still
takes the hook, and a kafka-python whose private names changed gets stock parsing with one warning.
Run on both kafka-python lines the range allows (2.3.x, 3.0.x)."""

from __future__ import annotations

import logging
import struct
from typing import Any

import pytest
from crc32c import crc32c
from kafka import KafkaConsumer
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
from kafka.structs import TopicPartition

from pipeline.kafka import fast_fetch
from pipeline.kafka.fast_fetch import FastPartitionRecords, UndecodableBatchError, install
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
    return [
        RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in recs
    ], part.next_fetch_offset


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


# a transaction's COMMIT marker: control record key = (version 0, type 1), value = (version 0, coordinator epoch 0)
COMMIT_MARKER: list[tuple[int, bytes, bytes, list[Any]]] = [
    (1_700_000_000_003, b"\x00\x00\x00\x01", b"\x00\x00\x00\x00\x00\x00", [])
]
GZIP, SNAPPY, LZ4, ZSTD = 1, 2, 3, 4

CASES = {
    "plain": _batch(0, RECORDS),
    "two batches, base offsets": _batch(10, RECORDS[:2]) + _batch(12, RECORDS[2:]),
    "gzip": _batch(0, RECORDS, compression=GZIP),
    "snappy": _batch(0, RECORDS, compression=SNAPPY),
    "lz4": _batch(0, RECORDS, compression=LZ4),
    "zstd": _batch(0, RECORDS, compression=ZSTD),
    "mixed codecs": _batch(0, RECORDS[:2], compression=LZ4)
    + _batch(2, RECORDS[2:3], compression=ZSTD)
    + _batch(3, RECORDS[3:], compression=SNAPPY),
    "log append time": _with_attributes(_batch(0, RECORDS), 0x08),
    "control batch skipped": _batch(0, RECORDS[:2])
    + _with_attributes(_batch(2, RECORDS[:1]), 0x20)
    + _batch(3, RECORDS[2:]),
    "commit marker (transactional control batch) skipped": _batch(0, RECORDS[:2])
    + _with_attributes(_batch(2, COMMIT_MARKER), 0x10 | 0x20)
    + _batch(3, RECORDS[2:], compression=LZ4),
    "compressed control batch skipped": _with_attributes(_batch(0, COMMIT_MARKER, compression=ZSTD), 0x10 | 0x20)
    + _batch(1, RECORDS),
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
        assert fast_fetch.self_test() is None, fast_fetch.self_test()
        assert install(consumer)
        assert consumer._fetcher.PartitionRecords is FastPartitionRecords  # noqa: SLF001 - the fetcher internals fast_fetch hooks
    finally:
        consumer.close()


@pytest.mark.parametrize("private", ["_maybe_uncompress", "records_count", "first_timestamp"])
def test_falls_back_to_stock_parsing_with_one_warning_if_a_private_name_is_gone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, private: str
) -> None:
    from kafka.record.default_records import DefaultRecordBatch

    monkeypatch.delattr(DefaultRecordBatch, private)
    monkeypatch.setattr(fast_fetch, "_self_test", {})  # not cached from an earlier test
    monkeypatch.setattr(fast_fetch, "_warned", False)
    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:9", api_version=(2, 8))
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.kafka.fast_fetch"):
            assert not install(consumer)
            assert not install(consumer)
        assert consumer._fetcher.PartitionRecords is Fetcher.PartitionRecords  # noqa: SLF001 - as above
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "pipeline.kafka.fast_fetch"
        ]
        assert len(warnings) == 1 and "fast record parsing is off" in warnings[0] and private in warnings[0]
    finally:
        consumer.close()
    monkeypatch.undo()
    assert fast_fetch.self_test() is None  # the real one, cached before


@pytest.mark.parametrize(("codec", "check"), [(SNAPPY, "has_snappy"), (LZ4, "has_lz4"), (ZSTD, "has_zstd")])
def test_a_codec_without_its_library_names_topic_partition_and_offset(
    monkeypatch: pytest.MonkeyPatch, codec: int, check: str
) -> None:
    import kafka.codec

    buf = _batch(40, RECORDS[:2]) + _batch(42, RECORDS[2:], compression=codec)
    monkeypatch.setattr(kafka.codec, check, lambda: False)
    part = FastPartitionRecords(40, TP, MemoryRecords(buf))
    first = part.take()  # the records before the undecodable batch still come through
    assert [r.offset for r in first] == [40, 41]
    with pytest.raises(UndecodableBatchError) as err:
        part.take()
    assert (err.value.topic, err.value.partition, err.value.offset) == ("topic", 3, 42)
    assert "compression codec not found" in str(err.value) and "topic[3] at offset 42" in str(err.value)
