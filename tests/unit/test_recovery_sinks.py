"""Kafka send errors after the database commit never crash the processor (issue 12): the outbox relay turns
any publish error into 'rows stay unpublished, retried next checkpoint'; the dead-letter sink retries a
failed send with backoff and re-sends records whose delivery failed, failing the checkpoint (retried)
instead of committing past them. The relay runs on a real SQLite store; the producers are scripted."""

from __future__ import annotations

from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError

from pipeline.alerts.outbox import OutboxRelay
from pipeline.checkpointing.rows import LifecycleWrite, OutboxRow
from pipeline.errors import SinkError
from pipeline.kafka.client import KafkaDeadLetterSink
from pipeline.records import RawRecord
from pipeline.sinks import AlertQueries, Database, SqlCheckpointStore


class FlakyPublisher:
    def __init__(self, failures: int) -> None:
        self.failures, self.published = failures, 0

    def publish(self, key: str, value: bytes) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        self.published += 1

    def flush(self) -> None:
        pass


def test_outbox_publish_error_after_commit_is_retried_not_raised(sqlite_store: Database) -> None:
    rows = [OutboxRow(message_id=f"k{i}#1", run_id="r", entity_id=f"C{i}", payload="{}") for i in range(3)]
    store, queries = SqlCheckpointStore(sqlite_store), AlertQueries(sqlite_store)
    store.write_checkpoint("r", "g", [], [], [], lifecycle=LifecycleWrite(outbox=rows))
    pub = FlakyPublisher(failures=1)
    relay = OutboxRelay(store, pub, "r")
    assert relay.try_drain() == 0  # the client's own exception type does not escape
    assert relay.backlog and len(queries.outbox_rows("r", unpublished=True)) == 3
    assert relay.try_drain() == 0 and pub.published == 0  # backing off: no attempt yet
    relay._retry_at = 0.0  # noqa: SLF001 - the backoff has passed
    assert relay.try_drain() == 3
    assert not relay.backlog and pub.published == 3 and not queries.outbox_rows("r", unpublished=True)


class Future:
    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.exception = None if ok else KafkaTimeoutError("expired")

    def failed(self) -> bool:
        return not self.ok


class FlakyProducer:
    """send() raises `raise_n` times; the first `fail_n` accepted records fail delivery."""

    def __init__(self, raise_n: int = 0, fail_n: int = 0) -> None:
        self.raise_n, self.fail_n = raise_n, fail_n
        self.sent: list[bytes] = []

    def send(self, topic: str, **kw: Any) -> Future:
        if self.raise_n > 0:
            self.raise_n -= 1
            raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        self.sent.append(kw["key"])
        ok = self.fail_n <= 0
        self.fail_n -= 1
        return Future(ok)

    def flush(self, timeout: float | None = None) -> None:
        pass


def _sink(producer: FlakyProducer) -> KafkaDeadLetterSink:
    sink = object.__new__(KafkaDeadLetterSink)
    sink.topic, sink.producer, sink.sent, sink._unflushed = "dlq", producer, 0, 0  # type: ignore[assignment]
    sink._queued = []
    return sink


def test_dead_letter_send_error_fails_the_checkpoint_until_sent() -> None:
    producer = FlakyProducer(raise_n=2)
    sink = _sink(producer)
    sink.send(RawRecord("t", 0, 5, b"k", b"{oops", 0), "malformed_json", "bad")
    assert producer.sent == []  # handed to the producer at the checkpoint, not before
    for _ in range(2):  # the checkpoint fails (and is retried with backoff by the processor)
        with pytest.raises(SinkError, match="dead-letter send failed"):
            sink.flush()
    sink.flush()
    assert producer.sent == [b"t:0:5"]


def test_dead_letter_delivery_failure_fails_the_checkpoint_and_resends() -> None:
    producer = FlakyProducer(fail_n=1)
    sink = _sink(producer)
    sink.send(RawRecord("t", 0, 5, b"k", b"{oops", 0), "malformed_json", "bad")
    sink.send(RawRecord("t", 0, 6, b"k", b"{oops", 0), "malformed_json", "bad")
    with pytest.raises(SinkError, match="1 dead letters were not delivered"):
        sink.flush()  # the checkpoint fails: offsets are not committed past an undelivered dead letter
    sink.flush()  # the failed record is sent again and delivered
    assert producer.sent == [b"t:0:5", b"t:0:6", b"t:0:5"]
    sink.flush()  # nothing left
    assert len(producer.sent) == 3
