"""Outbox -> alerts topic on real PostgreSQL and the Tansu broker: the topic and the table agree after a
crash between the database commit and the publish, and after a crash between publish and mark."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.alerts.outbox import OutboxRelay
from pipeline.errors import SinkError
from pipeline.kafka.client import KafkaPublisher, ensure_topics
from pipeline.kafka.tail import follow
from pipeline.sinks import AlertQueries, Database, SqlCheckpointStore
from tests.alerts_seed import seed


def _read(bootstrap: str, topic: str) -> list[tuple[str | None, dict[str, Any]]]:
    return [(k, json.loads(v)) for k, v in follow(bootstrap, topic, from_beginning=True, idle_timeout_s=1.5)]


class CrashAfterPublish:
    """The real producer, but the process 'dies' right after the broker acked: rows are never marked."""

    def __init__(self, inner: KafkaPublisher) -> None:
        self.inner = inner

    def publish(self, key: str, value: bytes) -> None:
        self.inner.publish(key, value)

    def flush(self) -> None:
        self.inner.flush()
        raise SinkError("crash after publish, before marking the outbox rows")


@pytest.fixture()
def alerts_topic(kafka_bootstrap: str, topic_prefix: str) -> str:
    topic = f"{topic_prefix}-alerts"
    ensure_topics(kafka_bootstrap, [topic], partitions=2)
    return topic


def test_crash_before_publish_is_republished_on_restart(
    pg_store: Database, kafka_bootstrap: str, alerts_topic: str
) -> None:
    queries = AlertQueries(pg_store)
    seed(pg_store)  # the checkpoint committed, then the process died before the relay ran
    rows = queries.outbox_rows("live", unpublished=True)
    assert rows
    publisher = KafkaPublisher(kafka_bootstrap, alerts_topic)
    try:
        relay = OutboxRelay(SqlCheckpointStore(pg_store), publisher, "live")  # the restarted worker
        assert relay.backlog and relay.drain() == len(rows)
        assert relay.drain() == 0
    finally:
        publisher.close()
    assert queries.outbox_rows("live", unpublished=True) == []
    got = _read(kafka_bootstrap, alerts_topic)
    assert sorted(m["incident"]["message_id"] for _, m in got) == sorted(r["message_id"] for r in rows)
    assert all(k == m["entity_id"] for k, m in got)  # keyed by entity
    # per entity, messages arrive in seq order; and the latest message agrees with the incident row
    latest: dict[str, dict[str, Any]] = {}
    for _, m in got:
        prev = latest.get(m["incident"]["key"])
        assert prev is None or prev["incident"]["seq"] < m["incident"]["seq"]
        latest[m["incident"]["key"]] = m
    for inc in queries.list_incidents(run_id="live"):
        m = latest[inc["incident_key"]]
        assert (m["incident"]["status"], m["incident"]["seq"], m["incident"]["alert_count"]) == (
            inc["status"],
            inc["seq"],
            inc["alert_count"],
        )


def test_crash_after_publish_before_mark_duplicates_but_consumers_dedupe(
    pg_store: Database, kafka_bootstrap: str, alerts_topic: str
) -> None:
    queries, outbox = AlertQueries(pg_store), SqlCheckpointStore(pg_store)
    seed(pg_store)
    rows = queries.outbox_rows("live")
    publisher = KafkaPublisher(kafka_bootstrap, alerts_topic)
    try:
        with pytest.raises(SinkError):
            OutboxRelay(outbox, CrashAfterPublish(publisher), "live").drain()
        assert len(queries.outbox_rows("live", unpublished=True)) == len(rows)  # nothing marked
        assert OutboxRelay(outbox, publisher, "live").drain() == len(rows)
    finally:
        publisher.close()
    got = _read(kafka_bootstrap, alerts_topic)
    assert len(got) == 2 * len(rows)  # at-least-once
    assert {m["incident"]["message_id"] for _, m in got} == {r["message_id"] for r in rows}


def test_cli_tail_follows_the_alerts_topic(pg_store: Database, kafka_bootstrap: str, alerts_topic: str) -> None:
    import typer

    from pipeline.alerts.cli import register

    app = typer.Typer()
    register(app)
    seed(pg_store)
    publisher = KafkaPublisher(kafka_bootstrap, alerts_topic)
    try:
        n = OutboxRelay(SqlCheckpointStore(pg_store), publisher, "live").drain()
    finally:
        publisher.close()
    res = CliRunner().invoke(
        app,
        [
            "alerts",
            "tail",
            "--bootstrap",
            kafka_bootstrap,
            "--topic",
            alerts_topic,
            "--from-beginning",
            "--max-messages",
            str(n),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert len(lines) == n and {m["incident"]["event"] for m in lines} == {"opened", "updated", "resolved"}


def test_tail_without_from_beginning_shows_only_messages_written_after_it_started(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Tansu answers "latest offset" with the start of the last batch, so `alerts tail` re-printed the last
    batch's old messages on every start. Now only what is written after the tail began comes out."""
    import threading
    import time

    from pipeline.kafka.client import make_producer

    topic = f"{topic_prefix}-tail"
    ensure_topics(kafka_bootstrap, [topic], 1)
    producer = make_producer(kafka_bootstrap)
    try:
        for batch in range(3):  # three batches of three, each flushed: the last batch starts at offset 6
            for i in range(3):
                producer.send(topic, key=b"k", value=json.dumps({"old": batch * 3 + i}).encode())
            producer.flush()

        def later() -> None:
            time.sleep(1.5)
            producer.send(topic, key=b"k", value=b'{"new": 1}')
            producer.flush()

        writer = threading.Thread(target=later)
        writer.start()
        got = [json.loads(v) for _, v in follow(kafka_bootstrap, topic, idle_timeout_s=4)]
        writer.join()
    finally:
        producer.close()
    assert got == [{"new": 1}]
