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
subclass of `Fetcher.PartitionRecords` set on the consumer's fetcher instance; `install` checks that
the private names it relies on exist and otherwise leaves the consumer alone (stock parsing, same
results), and tests/unit/test_fast_fetch.py fails if the installed kafka-python no longer takes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

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


def parse_batch(buf: bytes, pos: int, count: int, base_offset: int, timestamp: int, log_append_time: bool,
                topic: str, partition: int) -> list[RawRecord]:
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
                f"invalid record size: expected {length} bytes in record payload, read {pos - start}")
        append(RawRecord(topic, partition, base_offset + off_delta, key, value,
                         timestamp if log_append_time else timestamp + ts_delta))
    return out


class FastPartitionRecords(Fetcher.PartitionRecords):  # type: ignore[misc]
    """`Fetcher.PartitionRecords` whose records are `RawRecord`s, parsed a batch at a time."""

    def _unpack_records(self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any) -> Iterator[Any]:
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
                        f"Record batch for partition {tp} at offset {batch.base_offset} failed crc check")
                if batch.magic != 2:  # message format v0/v1: kafka-python's own records
                    for record in batch:
                        if self.check_crcs and not record.validate_crc():
                            raise Errors.CorruptRecordError(
                                f"Record for partition {tp} at offset {record.offset} failed crc check")
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
                batch._maybe_uncompress()
                log_append = bool(attributes & _LOG_APPEND_TIME)
                parsed = parse_batch(bytes(batch._buffer), batch._pos, batch.records_count, batch.base_offset,
                                     batch.max_timestamp if log_append else batch.first_timestamp, log_append,
                                     topic, partition)
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


def install(consumer: Any) -> bool:
    """Use FastPartitionRecords in this consumer's fetcher; False (stock parsing) if the hook is missing."""
    fetcher = getattr(consumer, "_fetcher", None)
    stock = getattr(fetcher, "PartitionRecords", None)
    if fetcher is None or stock is not Fetcher.PartitionRecords \
            or not hasattr(Fetcher.PartitionRecords, "_unpack_records"):
        log.warning("kafka-python's fetcher has no PartitionRecords hook; using its own record parser")
        return False
    fetcher.PartitionRecords = FastPartitionRecords
    return True
