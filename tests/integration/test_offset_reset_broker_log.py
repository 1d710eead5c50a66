"""Fault 4 of issue 11: the broker's log no longer holds the stored positions (a memory-only broker
restarted, a topic recreated). The processor notices (the fetch high watermark is below its position;
Tansu answers end_offsets() wrongly, so the watermark is what is compared), logs an ERROR naming topic,
partition, stored position and log range, counts it in pipeline_offset_resets_total, and applies
PIPELINE_OFFSET_RESET (default earliest): every new event is read and scored, with alert keys that cannot
collide with the old log's. While the broker is down the log shows our own warnings, not a flood of
kafka-python connection errors."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from pipeline.simulate import simulate_sensors, strip_labels
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import Runner, make_processor, produce_sensors, settings_for, wait_until


def _durable(db: SqlTestStore, run_id: str, group: str) -> int:
    try:
        return sum(c for c, _ in db.load_offsets(run_id, group).values())
    except Exception:  # noqa: BLE001
        return -1


def _resets(topic: str) -> float:
    return REGISTRY.get_sample_value("pipeline_offset_resets_total", {"topic": topic, "reason": "past the end"}) or 0


def test_broker_log_reset_is_detected_logged_counted_and_read_from_the_start(
    fresh_broker: Any, sqlite_store: SqlTestStore, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    boot = fresh_broker.bootstrap
    s = settings_for(topic_prefix, sqlite_store.url)
    old, _ = simulate_sensors(24, 40, seed=3, start=1_583_748_873.0)
    new, injected = simulate_sensors(24, 30, seed=4, start=1_583_748_873.0 + 40 * 60.0, spike_devices=2, anomaly_len=10)
    old, new = strip_labels(old), strip_labels(new)
    produce_sensors(boot, s.sensors_topic, old)
    proc, source, dlq = make_processor(s, boot, sqlite_store, commit_interval_ms=50, snapshot_interval_s=0.5)
    before = _resets(s.sensors_topic)
    runner = Runner(proc).start()
    try:
        wait_until(lambda: _durable(sqlite_store, "live", s.group_id) == len(old), 60, "old log durable")
        fresh_broker.stop(kill=True)  # memory storage: the log is gone
        wait_until(lambda: source.broker_down, 30, "the processor noticing the broker is gone")
        outage_from = len(caplog.records)
        time.sleep(4.0)
        fresh_broker.start()  # same port, empty log: offsets start at 0 again
        outage = caplog.records[outage_from:]
        produce_sensors(boot, s.sensors_topic, new)  # fewer records per partition than the old positions
        wait_until(lambda: _durable(sqlite_store, "live", s.group_id) == len(new), 60, "new log durable")
    finally:
        runner.stop.set()
        runner.join(30)
        source.close()
        dlq.close()
    assert proc.stats.scored == len(old) + len(new), "events of the new log were skipped"
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and r.name == "pipeline.processing.recovery"
    ]
    assert any(
        s.sensors_topic in m and "stored position" in m and "past the end" in m and "earliest" in m for m in errors
    ), errors
    assert _resets(s.sensors_topic) > before
    # the outage is reported by our own (backed-off) warnings, not one kafka-python ERROR per attempt
    kafka_errors = [r for r in outage if r.name.startswith("kafka") and r.levelno >= logging.ERROR]
    assert len(kafka_errors) <= 4, [r.getMessage() for r in kafka_errors]
    # the new log's anomalies are alerted, under keys of the new log epoch
    new_alerts = [a for a in sqlite_store.list_alerts(run_id="live") if a["alert_key"].endswith("~1")]
    assert set(injected.entities) <= {a["entity_id"] for a in new_alerts}
    assert all(a["event_time"].timestamp() >= 1_583_748_873.0 + 40 * 60.0 - 1 for a in new_alerts)


def test_offset_reset_fail_policy_stops_with_a_clear_error(
    fresh_broker: Any, sqlite_store: SqlTestStore, topic_prefix: str
) -> None:
    from pipeline.errors import OffsetResetError

    boot = fresh_broker.bootstrap
    s = settings_for(topic_prefix, sqlite_store.url)
    recs = strip_labels(simulate_sensors(8, 20, seed=5)[0])
    produce_sensors(boot, s.sensors_topic, recs)
    proc, source, dlq = make_processor(s, boot, sqlite_store, commit_interval_ms=50, offset_reset="fail")
    runner = Runner(proc).start()
    try:
        wait_until(lambda: _durable(sqlite_store, "live", s.group_id) == len(recs), 60, "log durable")
        fresh_broker.stop(kill=True)
        fresh_broker.start()
        produce_sensors(boot, s.sensors_topic, recs[:20])
        runner.thread.join(60)
        assert not runner.thread.is_alive(), "did not stop on a reset log with PIPELINE_OFFSET_RESET=fail"
    finally:
        runner.stop.set()
        source.close()
        dlq.close()
    assert isinstance(runner.error, OffsetResetError) and "PIPELINE_OFFSET_RESET=fail" in str(runner.error)
    assert _durable(sqlite_store, "live", s.group_id) == len(recs), "positions moved although the policy is fail"
