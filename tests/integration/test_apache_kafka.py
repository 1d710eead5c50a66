"""The same service on real Apache Kafka (testcontainers where Docker runs, or KAFKA_BOOTSTRAP)."""

from __future__ import annotations

from pathlib import Path

from pipeline.simulate import simulate_sensors, strip_labels
from tests.service_helpers import produce, run_processor, topic_env
from tests.sql_helpers import SqlTestStore


def test_processor_on_apache_kafka(
    apache_kafka: str, sqlite_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    env = topic_env(topic_prefix, apache_kafka, sqlite_store.url, session_timeout_ms=10000, heartbeat_interval_ms=3000)
    sn, injected = simulate_sensors(20, 300, seed=22, spike_devices=1, drift_devices=1)
    produce(apache_kafka, env["PIPELINE_SENSORS_TOPIC"], ((r["device_id"], r) for r in strip_labels(sn)))
    run_processor(env, log_path=tmp_path / "proc.log")
    alerted = {a["entity_id"] for a in sqlite_store.list_alerts(run_id="live")}
    assert alerted == set(injected.entities)
    assert sqlite_store.load_offsets("live", env["PIPELINE_GROUP_ID"])
