"""kafka-python consumer/producer/admin wrappers behind the broker-neutral interfaces in pipeline.records."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, NoBrokersAvailable, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata, TopicPartition

from pipeline.errors import BrokerError, SinkError
from pipeline.kafka import fast_fetch
from pipeline.records import AssignCallback, RawRecord
from pipeline.records import TopicPartition as TP

log = logging.getLogger(__name__)


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int = 4, timeout_s: float = 30.0,
                  config: Mapping[str, str] | None = None) -> None:
    """Create topics that do not exist yet (explicitly: Tansu does not auto-create)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
            break
        except NoBrokersAvailable as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"no broker at {bootstrap}") from exc
            time.sleep(0.5)
    try:
        existing = _existing_topics(bootstrap)  # admin.list_topics() trips over Tansu's ACL bits
        new = [NewTopic(t, num_partitions=partitions, replication_factor=1, topic_configs=dict(config or {}))
               for t in dict.fromkeys(topics) if t not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won
                admin.create_topics(new)
    finally:
        admin.close()


def _existing_topics(bootstrap: str) -> set[str]:
    probe = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        return set(probe.topics())
    finally:
        probe.close()


def make_producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    opts: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "retries": 10,
        "max_in_flight_requests_per_connection": 1,  # keeps per-partition order across retries
        "request_timeout_ms": 15000,
    }
    opts.update(overrides)
    return KafkaProducer(**opts)


def produce_json(producer: KafkaProducer, topic: str, records: Iterable[tuple[str | None, Any]],
                 timestamp_ms: Iterable[int | None] | None = None) -> int:
    n = 0
    stamps = iter(timestamp_ms) if timestamp_ms is not None else None
    for key, value in records:
        body = value if isinstance(value, bytes) else orjson.dumps(value)
        ts = next(stamps) if stamps is not None else None
        producer.send(topic, key=key.encode() if key is not None else None, value=body, timestamp_ms=ts)
        n += 1
    producer.flush()
    return n


def produce_labels(producer: KafkaProducer, topic: str, labels: Iterable[Mapping[str, Any]], *, fanout: bool = True,
                   timestamp_ms: Iterable[int | None] | None = None) -> int:
    """Label feedback records (schemas/transaction_label), keyed by customer_id. fanout=True writes each label
    to every partition, so every partition's terminal context sees all of a terminal's labels: what models
    with `label_fanout` in their card were trained on. Returns records sent."""
    parts: list[int | None] = sorted(producer.partitions_for(topic)) if fanout else [None]
    stamps = iter(timestamp_ms) if timestamp_ms is not None else None
    n = 0
    for lab in labels:
        body, key = orjson.dumps(lab), str(lab["customer_id"]).encode()
        ts = next(stamps) if stamps is not None else None
        for p in parts:
            producer.send(topic, key=key, value=body, partition=p, timestamp_ms=ts)
            n += 1
    producer.flush()
    return n


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_assigned: AssignCallback, on_revoked: AssignCallback) -> None:
        self.on_assigned, self.on_revoked = on_assigned, on_revoked

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.on_revoked([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.on_assigned([(tp.topic, tp.partition) for tp in assigned])


class KafkaSource:
    """Consumer-group member with manual commits; positions come from the processor's checkpoints."""

    def __init__(self, bootstrap: str, group_id: str | None, *, session_timeout_ms: int = 6000,
                 heartbeat_interval_ms: int = 1000, client_id: str = "anomaly-pipeline",
                 commit_timeout_ms: int = 5000, fast_parse: bool = True, **overrides: Any) -> None:
        """fast_parse: records parsed by pipeline.kafka.fast_fetch (RawRecords straight from the fetched
        batches) instead of kafka-python's per-record objects; same records, ~3x less CPU."""
        opts: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "group_id": group_id,
            "client_id": client_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": heartbeat_interval_ms,
            "max_poll_interval_ms": 300000,
            "fetch_max_bytes": 16 * 1024 * 1024,
            "max_partition_fetch_bytes": 4 * 1024 * 1024,
            "receive_message_max_bytes": 64 * 1024 * 1024,  # Tansu may exceed fetch_max_bytes
            "reconnect_backoff_max_ms": 2000,
            # the broker answers a fetch as soon as data is there, or after this; Tansu tends to hold fetches
            # to the limit, and kafka-python's 500 ms default doubled the bench's median latency (the service
            # passes PIPELINE_FETCH_MAX_WAIT_MS, 20 ms by default, as the bench measures)
            "fetch_max_wait_ms": 20,
        }
        opts.update(overrides)
        try:
            self.consumer = KafkaConsumer(**opts)
        except NoBrokersAvailable as exc:
            raise BrokerError(f"no broker at {bootstrap}") from exc
        self.fast_parse = fast_parse and fast_fetch.install(self.consumer)
        self.bootstrap = bootstrap
        self.commit_timeout_ms = commit_timeout_ms
        self._checked_at = time.monotonic()
        self._down_since: float | None = None

    def _watch_connection(self, now: float) -> None:
        """Log broker loss and recovery once each (kafka-python reconnects by itself, with backoff)."""
        try:
            client = self.consumer._client
            nodes = [b.nodeId for b in client.cluster.brokers()]
            up = any(client.connected(n) for n in nodes) if nodes else True
        except Exception:  # noqa: BLE001 - diagnostics must never break the poll loop
            return
        if not up and self._down_since is None:
            self._down_since = now
            log.warning("lost connection to Kafka at %s; reconnecting with backoff. Processing pauses, offsets "
                        "are not committed, nothing is skipped", self.bootstrap)
        elif up and self._down_since is not None:
            log.warning("reconnected to Kafka at %s after %.1fs; resuming from the last durable positions",
                        self.bootstrap, now - self._down_since)
            self._down_since = None

    @property
    def broker_down(self) -> bool:
        return self._down_since is not None

    def subscribe(self, topics: Sequence[str], on_assigned: AssignCallback, on_revoked: AssignCallback) -> None:
        self.consumer.subscribe(list(topics), listener=_Listener(on_assigned, on_revoked))

    def assign(self, tps: Sequence[TP]) -> None:
        self.consumer.assign([TopicPartition(t, p) for t, p in tps])

    def partitions_for(self, topic: str) -> list[int]:
        parts = self.consumer.partitions_for_topic(topic)
        return sorted(parts or [])

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        now = time.monotonic()
        if now - self._checked_at >= 1.0:
            self._checked_at = now
            self._watch_connection(now)
        out: list[RawRecord] = []
        if self.fast_parse:  # already RawRecords
            for recs in batches.values():
                out.extend(recs)
            return out
        for recs in batches.values():
            out.extend(RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in recs)
        return out

    def seek(self, tp: TP, offset: int) -> None:
        self.consumer.seek(TopicPartition(*tp), offset)

    def seek_to_beginning(self, tp: TP) -> None:
        self.consumer.seek_to_beginning(TopicPartition(*tp))

    def position(self, tp: TP) -> int:
        return int(self.consumer.position(TopicPartition(*tp)))

    def committed(self, tp: TP) -> int | None:
        off = self.consumer.committed(TopicPartition(*tp))
        return None if off is None else int(off)

    def commit(self, offsets: Mapping[TP, int]) -> None:
        if not offsets:
            return
        try:
            # bounded: kafka-python's default blocks until the coordinator is back, which would freeze the
            # processor (and its shutdown) for as long as the broker is down
            self.consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()},
                                 timeout_ms=self.commit_timeout_ms)
        except KafkaError as exc:
            self._watch_connection(time.monotonic())
            # Outputs are already durable and positions live in the database checkpoint too, so a failed
            # group commit only delays lag reporting; it never loses or duplicates output.
            log.warning("kafka offset commit failed (outputs are durable; will retry next checkpoint): %s", exc)

    def highwater(self, tp: TP) -> int | None:
        hw = self.consumer.highwater(TopicPartition(*tp))
        return None if hw is None else int(hw)

    def caught_up(self, tp: TP) -> bool:
        hw = self.highwater(tp)
        return hw is not None and self.position(tp) >= hw

    def pause(self, tp: TP) -> None:
        self.consumer.pause(TopicPartition(*tp))

    def resume(self, tp: TP) -> None:
        self.consumer.resume(TopicPartition(*tp))

    def lag(self) -> int | None:
        """Records behind the high watermark (None until every assigned partition has been fetched once)."""
        total = 0
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)  # end_offsets() is wrong on Tansu; the fetch highwater is not
            if hw is None:
                return None
            total += max(0, hw - self.consumer.position(tp))
        return total

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except KafkaError as exc:  # pragma: no cover - best effort on shutdown
            log.warning("consumer close: %s", exc)


class KafkaDeadLetterSink:
    """Dead-letter records: original bytes, plus headers with the reason and the source position."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.producer = make_producer(bootstrap)
        self.sent = 0
        self._unflushed = 0

    def send(self, record: RawRecord, reason: str, detail: str) -> None:
        envelope = {
            "reason": reason,
            "detail": detail[:2000],
            "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
            "key": record.key.decode("utf-8", "replace") if record.key else None,
            "value": (record.value or b"")[:70000].decode("utf-8", "replace"),
            "value_bytes": len(record.value or b""),
        }
        self.producer.send(
            self.topic,
            key=f"{record.topic}:{record.partition}:{record.offset}".encode(),
            value=orjson.dumps(envelope),
            headers=[("dlq.reason", reason.encode()), ("dlq.source.topic", record.topic.encode()),
                     ("dlq.source.partition", str(record.partition).encode()),
                     ("dlq.source.offset", str(record.offset).encode())],
        )
        self.sent += 1
        self._unflushed += 1

    def flush(self) -> None:
        if not self._unflushed:  # every checkpoint flushes; waking the sender thread for nothing cost ~3% of the
            return               # processor thread (GIL hand-offs) at 10 checkpoints/s
        try:
            self.producer.flush(timeout=30)
        except KafkaError as exc:
            raise SinkError(f"dead-letter flush failed: {exc}") from exc
        self._unflushed = 0

    def close(self) -> None:
        self.producer.close(timeout=10)


class KafkaPublisher:
    """Plain keyed publisher (alerts topic)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.producer = make_producer(bootstrap)

    def publish(self, key: str, value: bytes) -> None:
        self.producer.send(self.topic, key=key.encode(), value=value)

    def flush(self) -> None:
        try:
            self.producer.flush(timeout=30)
        except KafkaError as exc:
            raise SinkError(f"publish flush failed: {exc}") from exc

    def close(self) -> None:
        self.producer.close(timeout=10)


def read_at(bootstrap: str, positions: Iterable[tuple[str, int, int]], timeout_s: float = 10.0
            ) -> dict[tuple[str, int, int], RawRecord]:
    """The records at given (topic, partition, offset) positions, without a consumer group; positions that no
    longer exist (retention) are missing from the result."""
    wanted = set(positions)
    out: dict[tuple[str, int, int], RawRecord] = {}
    if not wanted:
        return out
    src = KafkaSource(bootstrap, None)
    try:
        for tp in sorted({(t, p) for t, p, _ in wanted}):
            src.assign([tp])
            for off in sorted(o for t, p, o in wanted if (t, p) == tp):
                if (tp[0], tp[1], off) in out:
                    continue
                src.seek(tp, off)
                deadline = time.monotonic() + timeout_s
                while (tp[0], tp[1], off) not in out and time.monotonic() < deadline:
                    recs = src.poll(200, 500)
                    for r in recs:
                        if (r.topic, r.partition, r.offset) in wanted:
                            out[(r.topic, r.partition, r.offset)] = r
                    if recs and recs[-1].offset >= off and (tp[0], tp[1], off) not in out:
                        break  # the offset was skipped (compacted or deleted)
        return out
    finally:
        src.close()


def read_topic(bootstrap: str, topic: str, idle_polls: int = 3) -> list[RawRecord]:
    """Everything currently in `topic`, from the beginning, without a consumer group (tools, demo, tests)."""
    src = KafkaSource(bootstrap, None)  # no group: nothing is committed
    try:
        parts = src.partitions_for(topic)
        src.assign([(topic, p) for p in parts])
        for p in parts:
            src.seek_to_beginning((topic, p))
        out: list[RawRecord] = []
        idle = 0
        while idle < idle_polls:
            recs = src.poll(500, 10000)
            idle = 0 if recs else idle + 1
            out.extend(recs)
        return out
    finally:
        src.close()
