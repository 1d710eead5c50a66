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
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnsupportedCodecError
from kafka.structs import OffsetAndMetadata, TopicPartition

from pipeline import metrics
from pipeline.errors import BrokerError, SinkError
from pipeline.kafka import fast_fetch
from pipeline.kafka.compat import NoBrokersAvailable, beginning_offsets, node_id, rebalance_listener
from pipeline.logs import RateLimit
from pipeline.records import AssignCallback, RawRecord
from pipeline.records import TopicPartition as TP

log = logging.getLogger(__name__)


# kafka-python logs every failed reconnect attempt (45 ERROR lines in 33 s of broker downtime): each message
# template once a minute; KafkaSource logs the outage itself, with backoff
_quiet = RateLimit()
for _name in (
    "kafka.conn",
    "kafka.client",
    "kafka.cluster",
    "kafka.coordinator",
    "kafka.coordinator.consumer",
    "kafka.consumer.fetcher",
    "kafka.consumer.group",
    "kafka.producer.sender",
    "kafka.producer.kafka",
    # kafka-python 3.0's network layer
    "kafka.net.manager",
    "kafka.net.connection",
    "kafka.net.transport",
    "kafka.net.selector",
    "kafka.net.compat",
):
    logging.getLogger(_name).addFilter(_quiet)


def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    partitions: int = 4,
    timeout_s: float = 30.0,
    config: Mapping[str, str] | None = None,
) -> None:
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
        new = [
            NewTopic(t, num_partitions=partitions, replication_factor=1, topic_configs=dict(config or {}))
            for t in dict.fromkeys(topics)
            if t not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won
                admin.create_topics(new)
    finally:
        admin.close()


def _existing_topics(bootstrap: str) -> set[str]:
    probe = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)  # no group: no auto-commit warning
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
        # as kafka-python 2.3's default (3.0 turned it on): consumers dedupe on message ids, and an idempotent
        # producer stops on UnknownProducerId when a broker loses its producer state (restart, truncation)
        "enable_idempotence": False,
        "request_timeout_ms": 15000,
    }
    opts.update(overrides)
    return KafkaProducer(**opts)


def produce_json(
    producer: KafkaProducer,
    topic: str,
    records: Iterable[tuple[str | None, Any]],
    timestamp_ms: Iterable[int | None] | None = None,
) -> int:
    n = 0
    stamps = iter(timestamp_ms) if timestamp_ms is not None else None
    for key, value in records:
        body = value if isinstance(value, bytes) else orjson.dumps(value)
        ts = next(stamps) if stamps is not None else None
        producer.send(topic, key=key.encode() if key is not None else None, value=body, timestamp_ms=ts)
        n += 1
    producer.flush()
    return n


def produce_labels(
    producer: KafkaProducer,
    topic: str,
    labels: Iterable[Mapping[str, Any]],
    *,
    fanout: bool = True,
    timestamp_ms: Iterable[int | None] | None = None,
    key_field: str = "customer_id",
) -> int:
    """Label feedback records (schemas/transaction_label), keyed by customer (`key_field`: the payments
    stream's entity_key where a stream file renames it). fanout=True writes each label
    to every partition, so every partition's terminal context sees all of a terminal's labels: what models
    with `label_fanout` in their card were trained on. Returns records sent."""
    parts: list[int | None] = sorted(producer.partitions_for(topic)) if fanout else [None]
    stamps = iter(timestamp_ms) if timestamp_ms is not None else None
    n = 0
    for lab in labels:
        body, key = orjson.dumps(lab), str(lab[key_field]).encode()
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

    def __init__(
        self,
        bootstrap: str,
        group_id: str | None,
        *,
        session_timeout_ms: int = 6000,
        heartbeat_interval_ms: int = 1000,
        client_id: str = "anomaly-pipeline",
        commit_timeout_ms: int = 5000,
        fast_parse: bool = True,
        **overrides: Any,
    ) -> None:
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
        # partitions stopped on a batch this install cannot decode (not ready). Replaced, never changed in
        # place: the API thread reads it while the poll thread writes it
        self.stopped: dict[TP, str] = {}
        self._log_starts: dict[TP, int | None] = {}  # during an assignment callback: looked up in one request
        self._unlooked: list[TP] = []  # ... once the first partition's is asked for
        self._listener: Any = None
        self._warn_at = 0.0  # next "still down" warning (backoff)

    def _watch_connection(self, now: float) -> None:
        """Log broker loss and recovery once each (kafka-python reconnects by itself, with backoff)."""
        try:
            client = self.consumer._client  # noqa: SLF001 - the consumer's connection state has no public API
            nodes = [node_id(b) for b in client.cluster.brokers()]
            up = any(client.connected(n) for n in nodes) if nodes else True
        except Exception:  # noqa: BLE001 - diagnostics must never break the poll loop
            return
        if not up and self._down_since is None:
            self._down_since = now
            self._warn_at = now + 2.0
            log.warning(
                "lost connection to Kafka at %s; reconnecting with backoff. Processing pauses, offsets "
                "are not committed, nothing is skipped",
                self.bootstrap,
            )
        elif not up and self._down_since is not None and now >= self._warn_at:
            down = now - self._down_since
            self._warn_at = now + min(max(2.0, down), 30.0)
            log.warning(
                "Kafka at %s still unreachable after %.0fs; reconnecting (next notice in %.0fs)",
                self.bootstrap,
                down,
                self._warn_at - now,
            )
        elif up and self._down_since is not None:
            log.warning(
                "reconnected to Kafka at %s after %.1fs; resuming from the last durable positions",
                self.bootstrap,
                now - self._down_since,
            )
            self._down_since = None

    @property
    def broker_down(self) -> bool:
        return self._down_since is not None

    def subscribe(self, topics: Sequence[str], on_assigned: AssignCallback, on_revoked: AssignCallback) -> None:
        def assigned(tps: Sequence[TP]) -> None:
            self._log_starts, self._unlooked = {}, sorted(tps)
            try:
                on_assigned(tps)
            finally:  # answers are for the assignment only: a later call (a log reset) asks again
                self._log_starts, self._unlooked = {}, []

        def revoked(tps: Sequence[TP]) -> None:
            try:
                on_revoked(tps)
            finally:  # a stopped partition that moved to another member no longer makes this one unready
                self._unstop(tps)

        self._listener = rebalance_listener(_Listener(assigned, revoked))
        self.consumer.subscribe(list(topics), listener=self._listener)

    def assign(self, tps: Sequence[TP]) -> None:
        self.consumer.assign([TopicPartition(t, p) for t, p in tps])

    def partitions_for(self, topic: str) -> list[int]:
        parts = self.consumer.partitions_for_topic(topic)
        return sorted(parts or [])

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        try:
            batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except UnsupportedCodecError as exc:
            self._stop_undecodable(exc)
            return []
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

    def _stop_undecodable(self, exc: UnsupportedCodecError) -> None:
        """Pause the partition whose batch cannot be decompressed, logging it once: retrying cannot help until
        the codec library is installed, and the position stays there, so a restart with it loses nothing."""
        if isinstance(exc, fast_fetch.UndecodableBatchError):
            tps = [(exc.topic, exc.partition)]
            where = f"topic {exc.topic} partition {exc.partition} offset {exc.offset}"
        else:  # kafka-python's own parser does not say which partition: stop them all
            tps = sorted((tp.topic, tp.partition) for tp in self.consumer.assignment())
            where = f"one of partitions {tps}"
        why = f"{where}: {exc}"
        for tp in tps:
            self.consumer.pause(TopicPartition(*tp))
            if self.stopped.get(tp) != why:
                self.stopped = {**self.stopped, tp: why}
                log.error(
                    "stopped consuming %s: the batch is compressed with a codec this install cannot decode "
                    "(%s). Install the codec libraries (lz4, zstandard, python-snappy; runtime dependencies) "
                    "and restart: the partition resumes at that offset. Other partitions go on; not ready "
                    "until then",
                    where,
                    exc,
                )
        metrics.STOPPED_PARTITIONS.set(len(self.stopped))

    def _unstop(self, tps: Sequence[TP]) -> None:
        gone = set(tps)
        if gone & self.stopped.keys():
            self.stopped = {tp: why for tp, why in self.stopped.items() if tp not in gone}
            metrics.STOPPED_PARTITIONS.set(len(self.stopped))

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
            self.consumer.commit(
                {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()},
                timeout_ms=self.commit_timeout_ms,
            )
        except KafkaError as exc:
            self._watch_connection(time.monotonic())
            # Outputs are already durable and positions live in the database checkpoint too, so a failed
            # group commit only delays lag reporting; it never loses or duplicates output.
            log.warning("kafka offset commit failed (outputs are durable; will retry next checkpoint): %s", exc)

    def highwater(self, tp: TP) -> int | None:
        """The log end as of the last fetch (None before one). Used instead of end_offsets(), which Tansu
        answers wrongly (it reported 1 for a partition holding 10 records; the fetch high watermark is right)."""
        hw = self.consumer.highwater(TopicPartition(*tp))
        return None if hw is None else int(hw)

    def log_start(self, tp: TP, timeout_ms: int = 5000) -> int | None:
        """The partition's first offset (ListOffsets earliest; correct on Tansu), or None if unknown now.
        Within the assignment callback, the first call looks up every assigned partition in one request."""
        if tp in self._unlooked:
            self._log_starts.update(self._beginning_offsets(self._unlooked, timeout_ms))
            self._unlooked = []
        if tp in self._log_starts:
            return self._log_starts.pop(tp)
        return self._beginning_offsets([tp], timeout_ms)[tp]

    def _beginning_offsets(self, tps: Sequence[TP], timeout_ms: int) -> dict[TP, int | None]:
        try:
            found = beginning_offsets(self.consumer, [TopicPartition(*tp) for tp in tps], timeout_ms)
            return {
                tp: None if found.get(TopicPartition(*tp)) is None else int(found[TopicPartition(*tp)]) for tp in tps
            }
        except Exception as exc:  # noqa: BLE001 - unknown is a valid answer: the resume position goes unchecked
            log.warning(
                "cannot read the log start of %s (resume positions are not checked against it): %s",
                ", ".join(f"{t}[{p}]" for t, p in tps),
                exc,
            )
            return dict.fromkeys(tps)

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
        # kafka-python 3 calls on_partitions_revoked from close(); 2.3 does not, and the owner has taken its
        # final checkpoint already: keep the 2.3 behaviour (state stays for the caller to inspect)
        with contextlib.suppress(AttributeError):
            self._listener.closing = True
        try:
            self.consumer.close(autocommit=False)
        except KafkaError as exc:  # pragma: no cover - best effort on shutdown
            log.warning("consumer close: %s", exc)


class KafkaDeadLetterSink:
    """Dead-letter records: original bytes, plus headers with the reason and the source position.

    Records are handed to the producer at the checkpoint (`flush`), right before the database transaction
    that makes their source positions durable: a crash can then duplicate only the dead letters of that one
    checkpoint (same key, the source position), not those of a whole commit interval. A send or delivery
    error fails the flush, so the checkpoint is retried (with backoff) and no position passes a dead letter
    that is not in the topic."""

    def __init__(self, bootstrap: str | None, topic: str) -> None:
        if not bootstrap:  # Settings().kafka_bootstrap when KAFKA_BOOTSTRAP is unset (a kafka-python TypeError)
            raise BrokerError("the dead-letter producer needs a broker: set KAFKA_BOOTSTRAP")
        self.topic = topic
        self.producer = make_producer(bootstrap, max_block_ms=10000)  # one send attempt waits at most 10 s
        self.sent = 0
        self._unflushed = 0
        self._queued: list[dict[str, Any]] = []  # send kwargs not yet handed to the producer

    def send(self, record: RawRecord, reason: str, detail: str) -> None:
        envelope = {
            "reason": reason,
            "detail": detail[:2000],
            "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
            "key": record.key.decode("utf-8", "replace") if record.key else None,
            "value": (record.value or b"")[:70000].decode("utf-8", "replace"),
            "value_bytes": len(record.value or b""),
        }
        self._queued.append(
            {
                "key": f"{record.topic}:{record.partition}:{record.offset}".encode(),
                "value": orjson.dumps(envelope),
                "headers": [
                    ("dlq.reason", reason.encode()),
                    ("dlq.source.topic", record.topic.encode()),
                    ("dlq.source.partition", str(record.partition).encode()),
                    ("dlq.source.offset", str(record.offset).encode()),
                ],
            }
        )
        self.sent += 1
        self._unflushed += 1

    def flush(self) -> None:
        if not self._unflushed:  # every checkpoint flushes; waking the sender thread for nothing cost ~3% of the
            return  # processor thread (GIL hand-offs) at 10 checkpoints/s
        sent: list[tuple[Any, dict[str, Any]]] = []
        try:
            while self._queued:
                sent.append((self.producer.send(self.topic, **self._queued[0]), self._queued[0]))
                self._queued.pop(0)
            self.producer.flush(timeout=30)
        except KafkaError as exc:
            self._queued[:0] = [kw for _, kw in sent]  # whatever was handed over goes again (same key)
            raise SinkError(f"dead-letter send failed: {exc}") from exc
        # flush() returns even when a record failed for good (retries exhausted): queue those again and fail
        # the checkpoint (it is retried) rather than commit past a dead letter that is not in the topic
        failed = [(f, kw) for f, kw in sent if f.failed()]
        if failed:
            self._queued[:0] = [kw for _, kw in failed]
            raise SinkError(f"{len(failed)} dead letters were not delivered: {failed[0][0].exception}")
        self._unflushed = 0

    def close(self) -> None:
        self.producer.close(timeout=10)


class KafkaPublisher:
    """Plain keyed publisher (alerts topic)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.producer = make_producer(bootstrap, max_block_ms=10000)
        self._futures: list[Any] = []

    def publish(self, key: str, value: bytes) -> None:
        try:
            self._futures.append(self.producer.send(self.topic, key=key.encode(), value=value))
        except KafkaError as exc:
            raise SinkError(f"publish failed: {exc}") from exc

    def flush(self) -> None:
        """Raises SinkError unless every message published since the last flush was delivered."""
        futures, self._futures = self._futures, []
        try:  # bounded: the relay runs on the processor thread, which waits meanwhile
            self.producer.flush(timeout=10)
        except KafkaError as exc:
            raise SinkError(f"publish flush failed: {exc}") from exc
        failed = [f for f in futures if f.failed()]
        if failed:
            raise SinkError(f"{len(failed)} messages not delivered: {failed[0].exception}")

    def close(self) -> None:
        self.producer.close(timeout=10)


def read_at(
    bootstrap: str, positions: Iterable[tuple[str, int, int]], timeout_s: float = 10.0
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
