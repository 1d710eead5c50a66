"""A leaner record parser plugged into kafka-python's fetcher: fetched record batches become `RawRecord`s
directly, without kafka-python's per-record objects.

kafka-python parses every record in pure Python (`DefaultRecordBatch._read_msg`: a varint function call
per field, a `DefaultRecord`, then a `ConsumerRecord` namedtuple with header sizes) and `KafkaSource`
then copied each into a `RawRecord`: ~5.8 us per record on the bench machine, a fifth of the processor
thread at 20k events/s. `parse_batch` reads the same v2 format with an inlined varint fast path from
one `bytes` copy of the batch (~1.5 us per record including the `RawRecord`).

What stays kafka-python's: fetching, batch headers, CRC checks (`check_crcs`), decompression
(`_maybe_uncompress`), control batches, positions and metrics bookkeeping, and the whole stock path for
anything unusual (read_committed isolation, deserializers, message format v0/v1). The hook is a
subclass of `Fetcher.PartitionRecords` set on the consumer's fetcher instance. It relies on private
names of kafka-python (same in 2.3.x and 3.0.x): `Fetcher.PartitionRecords` (`_unpack_records`, `drain`,
`check_crcs`, `isolation_level`, `leader_epoch`, `next_fetch_offset`, `records_read`, `bytes_read`),
`KafkaConsumer._fetcher`, and on `DefaultRecordBatch` `_maybe_uncompress`, `_buffer`, `_pos`,
`records_count`, `first_timestamp`, `max_timestamp`, `next_offset`. Rather than trusting names,
`install` parses a few sample batches both ways once per process and uses the hook only if the records
and positions are identical; otherwise it logs one warning and leaves the consumer on stock parsing.
tests/unit/test_fast_fetch.py fails if the installed kafka-python no longer takes it.

A batch whose compression codec this install cannot decode raises `UndecodableBatchError` naming the
topic, partition and offset, so the source can stop that partition instead of failing every poll.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import kafka
import kafka.errors as Errors
from kafka.consumer.fetcher import Fetcher

from pipeline.records import RawRecord

log = logging.getLogger(__name__)

_LOG_APPEND_TIME = 0x08
_CONTROL = 0x20
READ_UNCOMMITTED = 0


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Zigzag varint at pos -> (value, next pos); multi-byte tail of the inlined fast path."""
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise Errors.CorruptRecordError("varint longer than 10 bytes")


def parse_batch(
    buf: bytes,
    pos: int,
    count: int,
    base_offset: int,
    timestamp: int,
    log_append_time: bool,
    topic: str,
    partition: int,
) -> list[RawRecord]:
    """`count` v2 records from buf[pos:] (uncompressed) -> RawRecords. Headers are read and dropped.

    A one-byte varint v is stored as zigzag: value = (v >> 1) ^ -(v & 1)."""
    out: list[RawRecord] = []
    append = out.append
    end_of_buf = len(buf)
    for _ in range(count):
        b = buf[pos]
        if b < 0x80:
            length, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            length, pos = _varint(buf, pos)
        start = pos
        pos += 1  # attributes (int8, unused)
        b = buf[pos]
        if b < 0x80:
            ts_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            ts_delta, pos = _varint(buf, pos)
        b = buf[pos]
        if b < 0x80:
            off_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            off_delta, pos = _varint(buf, pos)
        b = buf[pos]
        if b < 0x80:
            klen, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            klen, pos = _varint(buf, pos)
        if klen >= 0:
            key: bytes | None = buf[pos : pos + klen]
            pos += klen
        else:
            key = None
        b = buf[pos]
        if b < 0x80:
            vlen, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            vlen, pos = _varint(buf, pos)
        if vlen >= 0:
            value: bytes | None = buf[pos : pos + vlen]
            pos += vlen
        else:
            value = None
        b = buf[pos]
        if b == 0:
            pos += 1
        else:  # headers: skip them, but walk them so the size check below still holds
            nh, pos = _varint(buf, pos)
            if nh < 0:
                raise Errors.CorruptRecordError(f"invalid number of record headers {nh}")
            for _h in range(nh):
                hk, pos = _varint(buf, pos)
                if hk < 0:
                    raise Errors.CorruptRecordError(f"invalid negative header key size {hk}")
                pos += hk
                hv, pos = _varint(buf, pos)
                if hv > 0:
                    pos += hv
        if pos - start != length or pos > end_of_buf:
            raise Errors.CorruptRecordError(
                f"invalid record size: expected {length} bytes in record payload, read {pos - start}"
            )
        append(
            RawRecord(
                topic,
                partition,
                base_offset + off_delta,
                key,
                value,
                timestamp if log_append_time else timestamp + ts_delta,
            )
        )
    return out


class UndecodableBatchError(Errors.UnsupportedCodecError):  # type: ignore[misc]
    """A fetched batch is compressed with a codec this install cannot decode (library missing)."""

    def __init__(self, topic: str, partition: int, offset: int, detail: str) -> None:
        super().__init__(f"{topic}[{partition}] at offset {offset}: {detail}")
        self.topic, self.partition, self.offset, self.detail = topic, partition, offset, detail


_Stock: Any = getattr(Fetcher, "PartitionRecords", object)  # a kafka-python without it: install() says no


class FastPartitionRecords(_Stock):  # type: ignore[misc]
    """`Fetcher.PartitionRecords` whose records are `RawRecord`s, parsed a batch at a time."""

    def _unpack_records(self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any) -> Iterator[Any]:
        try:
            yield from self._unpack(tp, records, key_deserializer, value_deserializer)
        except UndecodableBatchError:
            raise
        except Errors.UnsupportedCodecError as exc:  # the position stays at the batch: a restart resumes there
            raise UndecodableBatchError(tp.topic, tp.partition, self.next_fetch_offset, str(exc)) from exc

    def _unpack(self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any) -> Iterator[Any]:
        if key_deserializer is not None or value_deserializer is not None or self.isolation_level != READ_UNCOMMITTED:
            for r in super()._unpack_records(tp, records, key_deserializer, value_deserializer):
                yield RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
            return
        topic, partition = tp.topic, tp.partition
        try:
            batch = records.next_batch()
            last_batch = None
            while batch is not None:
                last_batch = batch
                if self.check_crcs and not batch.validate_crc():
                    raise Errors.CorruptRecordError(
                        f"Record batch for partition {tp} at offset {batch.base_offset} failed crc check"
                    )
                if batch.magic != 2:  # message format v0/v1: kafka-python's own records
                    for record in batch:
                        if self.check_crcs and not record.validate_crc():
                            raise Errors.CorruptRecordError(
                                f"Record for partition {tp} at offset {record.offset} failed crc check"
                            )
                        self.records_read += 1
                        self.bytes_read += record.size_in_bytes
                        self.next_fetch_offset = record.offset + 1
                        yield RawRecord(topic, partition, record.offset, record.key, record.value, record.timestamp)
                    batch = records.next_batch()
                    continue
                self.leader_epoch = batch.leader_epoch
                attributes = batch.attributes
                if attributes & _CONTROL:
                    self.next_fetch_offset = batch.next_offset
                    batch = records.next_batch()
                    continue
                # kafka-python's private batch internals, on purpose: self_test() checks them at start-up
                batch._maybe_uncompress()  # noqa: SLF001
                log_append = bool(attributes & _LOG_APPEND_TIME)
                parsed = parse_batch(
                    bytes(batch._buffer),  # noqa: SLF001
                    batch._pos,  # noqa: SLF001
                    batch.records_count,
                    batch.base_offset,
                    batch.max_timestamp if log_append else batch.first_timestamp,
                    log_append,
                    topic,
                    partition,
                )
                self.bytes_read += batch.size_in_bytes
                for rec in parsed:
                    self.records_read += 1
                    self.next_fetch_offset = rec.offset + 1
                    yield rec
                batch = records.next_batch()
            else:
                # as kafka-python: the next fetch starts after the batch's last offset (compaction may have
                # removed its last records)
                if last_batch is not None and last_batch.magic == 2:
                    self.next_fetch_offset = last_batch.next_offset
                self.drain()
        except StopIteration:  # as kafka-python: a StopIteration must not end the generator silently
            log.exception("StopIteration raised unpacking messageset")
            raise RuntimeError("StopIteration raised unpacking messageset") from None


_self_test: dict[str, str | None] = {}  # "result": None (passed) or why the hook is not used; empty: not run
_warned = False  # the fallback warning is logged once per process


def self_test() -> str | None:
    """None if FastPartitionRecords gives exactly kafka-python's records and positions on sample batches
    (plain, gzip, log-append time, control, v1) with the installed kafka-python; else the reason."""
    if "result" not in _self_test:
        _self_test["result"] = _run_self_test()
    return _self_test["result"]


def _run_self_test() -> str | None:
    try:
        from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
        from kafka.structs import TopicPartition

        def build(base: int, magic: int = 2, compression: int = 0, attrs: int = 0) -> bytes:
            b = MemoryRecordsBuilder(magic, compression, 1 << 20, offset=base)
            for i in range(3):
                b.append(
                    1_700_000_000_000 + i,
                    None if i == 1 else b"k%d" % i,
                    b"v" * (i * 100),
                    [("h", b"x")] if magic == 2 and i == 2 else [],
                )
            b.close()
            buf = bytearray(b.buffer())
            if attrs:  # set attribute bits and fix the CRC (crc32c over attributes..end)
                from kafka.record.util import calc_crc32c

                buf[22] |= attrs
                buf[17:21] = calc_crc32c(bytes(buf[21:])).to_bytes(4, "big")
            return bytes(buf)

        sample = build(0) + build(3, compression=1) + build(6, attrs=0x08) + build(9, attrs=0x20) + build(12)
        tp = TopicPartition("self-test", 0)
        for buf in (sample, build(0, magic=1)):
            stock = Fetcher.PartitionRecords(0, tp, MemoryRecords(buf))
            want = [RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in stock.take()]
            fast = FastPartitionRecords(0, tp, MemoryRecords(buf))
            got = fast.take()
            if got != want or fast.next_fetch_offset != stock.next_fetch_offset or not got:
                return "its records or positions differ from kafka-python's on a sample batch"
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of the private-API probe means: do not hook
        return f"{type(exc).__name__}: {exc}"


def install(consumer: Any) -> bool:
    """Use FastPartitionRecords in this consumer's fetcher; False (stock parsing, one warning) if the
    installed kafka-python does not take it (see the module docstring)."""
    global _warned
    fetcher: Any = getattr(consumer, "_fetcher", None)
    if fetcher is None or getattr(fetcher, "PartitionRecords", None) is not _Stock or _Stock is object:
        why: str | None = "its fetcher has no PartitionRecords hook"
    else:
        why = self_test()
    if why is not None:
        if not _warned:
            _warned = True
            log.warning(
                "fast record parsing is off for kafka-python %s (%s); using its own parser: same "
                "records, ~3x more CPU per record",
                getattr(kafka, "__version__", "?"),
                why,
            )
        return False
    fetcher.PartitionRecords = FastPartitionRecords
    return True
