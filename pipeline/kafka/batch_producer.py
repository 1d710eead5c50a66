"""A lean producer for the benchmark's load generator: keyed records -> one v2 record batch per partition
-> one ProduceRequest per call, over kafka-python's network client.

`KafkaProducer.send` costs ~30 us of Python per record (partitioner, accumulator, locks, its own batch
builder), so a paced 20,000 events/s producer took most of a core on the bench machine, competing with
the processor it is meant to load. This one encodes a record in ~1 us (varints from a table, no
per-record objects) and sends the batches of a chunk in one request; the record timestamp is the send
time, as with `KafkaProducer`. The wire format is the one KafkaProducer writes (magic 2, no compression,
CreateTime, no producer id), and keys go to the same partitions (murmur2, as kafka-python's default
partitioner). Not a general producer: no retries beyond the request's own, no idempotence, no
compression; the product's producers (dead letters, alerts) stay `KafkaProducer`.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Sequence

from crc32c import crc32c
from kafka.errors import KafkaError, for_code
from kafka.partitioner.default import murmur2
from kafka.structs import TopicPartition

from pipeline.errors import BrokerError
from pipeline.kafka.compat import KafkaClient, produce_errors, produce_request


def _varint(value: int) -> bytes:
    z = (value << 1) ^ (value >> 63)  # zigzag
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_VARINT = [_varint(i) for i in range(1 << 16)]  # record sizes, offset deltas, key/value lengths
_HEADER = struct.Struct(">qiibIhiqqqhii")  # base offset ... record count: 61 bytes
_CRC_FROM = 21  # the CRC covers attributes .. end


def encode_batch(records: Sequence[tuple[bytes, bytes]], timestamp_ms: int) -> bytes:
    """A magic-2 record batch: keyed values, offsets 0..n-1 (the broker assigns real ones), one timestamp."""
    vi = _VARINT
    parts = []
    for i, (key, value) in enumerate(records):
        if len(value) >= 65000 or len(key) >= 512:
            raise ValueError("encode_batch is for small records (value < 65,000 bytes)")
        body = b"".join((b"\x00\x00", vi[i], vi[len(key)], key, vi[len(value)], value, b"\x00"))
        parts.append(vi[len(body)])
        parts.append(body)
    recs = b"".join(parts)
    n = len(records)
    head = _HEADER.pack(0, 49 + len(recs), 0, 2, 0, 0, n - 1, timestamp_ms, timestamp_ms, -1, -1, -1, n)
    crc = crc32c(head[_CRC_FROM:] + recs)
    return head[:17] + struct.pack(">I", crc) + head[_CRC_FROM:] + recs


class BatchProducer:
    """`send(records)` -> records on their partitions (acks=1), synchronously, one request per call."""

    def __init__(
        self, bootstrap: str, topic: str, *, acks: int = 1, timeout_ms: int = 15000, client_id: str = "bench-load"
    ) -> None:
        self.topic, self.acks, self.timeout_ms = topic, acks, timeout_ms
        self.client = KafkaClient(bootstrap_servers=bootstrap, client_id=client_id)
        deadline = time.monotonic() + timeout_ms / 1000
        parts: set[int] | None = None
        (getattr(self.client, "add_topic", None) or self.client.cluster.add_topic)(topic)  # 2.3 | 3.0
        while not parts:
            if time.monotonic() > deadline:
                raise BrokerError(f"no metadata for topic {topic!r} at {bootstrap}")
            self.client.poll(future=self.client.cluster.request_update(), timeout_ms=1000)
            parts = self.client.cluster.partitions_for_topic(topic)
        self.partitions = sorted(parts)
        self.leaders = {p: self.client.cluster.leader_for_partition(TopicPartition(topic, p)) for p in self.partitions}
        for node in set(self.leaders.values()):
            while not self.client.ready(node):
                if time.monotonic() > deadline:
                    raise BrokerError(f"cannot connect to broker {node} at {bootstrap}")
                self.client.poll(timeout_ms=100)
        self._partition_of: dict[bytes, int] = {}

    def partition(self, key: bytes) -> int:
        p = self._partition_of.get(key)
        if p is None:  # kafka-python's DefaultPartitioner
            p = self._partition_of[key] = self.partitions[(murmur2(key) & 0x7FFFFFFF) % len(self.partitions)]
        return p

    def send(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        by_part: dict[int, list[tuple[bytes, bytes]]] = {}
        part = self.partition
        for rec in records:
            by_part.setdefault(part(rec[0]), []).append(rec)
        now = int(time.time() * 1000)
        by_node: dict[int, list[tuple[int, bytes]]] = {}
        for p, recs in by_part.items():
            by_node.setdefault(self.leaders[p], []).append((p, encode_batch(recs, now)))
        futures = []
        for node, batches in by_node.items():
            req = produce_request(self.client, self.acks, self.timeout_ms, self.topic, batches)
            futures.append(self.client.send(node, req))
        for f in futures:
            self.client.poll(future=f, timeout_ms=self.timeout_ms)
            if not f.is_done:
                raise BrokerError(f"produce request to {self.topic} timed out")
            if f.failed():
                raise BrokerError(f"produce request to {self.topic} failed: {f.exception}")
            for p, code in produce_errors(f.value):
                raise BrokerError(f"produce to {self.topic}[{p}] failed: {for_code(code).__name__}")

    def close(self) -> None:
        with contextlib.suppress(KafkaError):  # best effort
            self.client.close()
