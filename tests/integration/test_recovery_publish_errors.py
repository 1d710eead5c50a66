"""Kafka send errors after the database commit never crash the processor (issue 12): the alerts topic's
broker goes away while incidents are being made. Checkpoints go on (alerts, incidents and outbox rows
durable, offsets committed), the outbox rows wait, and once the broker is back they are published. Real
brokers: the source topic on the session broker, the alerts topic on a private one that is stopped."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pipeline.alerts.lifecycle import IncidentTracker, LifecyclePolicy
from pipeline.alerts.outbox import OutboxRelay
from pipeline.kafka.client import KafkaPublisher, ensure_topics, read_topic
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import Runner, make_processor, produce_sensors, sensor_records, settings_for, wait_until


def _durable(db: SqlTestStore, group: str) -> int:
    try:
        return sum(c for c, _ in db.load_offsets("live", group).values())
    except Exception:  # noqa: BLE001
        return -1


def test_alerts_broker_down_after_commit_is_retried_not_fatal(
    kafka_bootstrap: str, fresh_broker: Any, pg_store: SqlTestStore, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    s = settings_for(topic_prefix, pg_store.url)
    alerts_topic = f"{topic_prefix}-alerts"
    ensure_topics(fresh_broker.bootstrap, [alerts_topic], 1)
    recs = sensor_records(24, 70)  # readings 55-69 of three pumps are anomalous
    normal, anomalous = recs[: 24 * 55], recs[24 * 55 :]
    produce_sensors(kafka_bootstrap, s.sensors_topic, normal)
    publisher = KafkaPublisher(fresh_broker.bootstrap, alerts_topic)
    tracker = IncidentTracker("live", LifecyclePolicy(), loader=lambda t, p: pg_store.open_incidents("live", t, p))
    relay = OutboxRelay(pg_store, publisher, "live", retry_max_s=2.0)
    proc, source, dlq = make_processor(
        s, kafka_bootstrap, pg_store, tracker=tracker, relay=relay, commit_interval_ms=50
    )
    runner = Runner(proc).start()
    try:
        wait_until(lambda: _durable(pg_store, s.group_id) == len(normal), 60, "normal part durable")
        fresh_broker.stop(kill=True)  # the alerts topic's broker is gone
        produce_sensors(kafka_bootstrap, s.sensors_topic, anomalous, create=False)
        wait_until(lambda: _durable(pg_store, s.group_id) == len(recs), 90, "everything durable")
        wait_until(
            lambda: any("alerts topic publish failed" in r.getMessage() for r in caplog.records), 60, "a failed publish"
        )
        assert runner.thread.is_alive() and runner.error is None, f"processor died: {runner.error!r}"
        unpublished = pg_store.outbox_rows("live", unpublished=True)
        assert unpublished, "incident messages were made while the alerts broker was down"
        fresh_broker.start()  # back (memory storage: empty, the topic is made again)
        ensure_topics(fresh_broker.bootstrap, [alerts_topic], 1)
        wait_until(lambda: not pg_store.outbox_rows("live", unpublished=True), 60, "outbox published")
    finally:
        runner.stop.set()
        runner.join(60)
        source.close()
        dlq.close()
        publisher.close()
    ids = {r["message_id"] for r in pg_store.outbox_rows("live")}
    published = read_topic(fresh_broker.bootstrap, alerts_topic)
    import orjson

    assert {orjson.loads(r.value or b"{}")["incident"]["message_id"] for r in published} >= {
        r["message_id"] for r in unpublished
    }
    assert ids and pg_store.count_alerts("live") > 0
