"""Issue 11, fault 1 (poison pill): a timestamp that leaves datetime's range in UTC used to pass validation and
crash `pipeline run` in the incident lifecycle, on every restart, storing no alert at all. Now it is
dead-lettered at validation (timestamp_out_of_range), the service keeps running, and every valid record gives
exactly the alerts of a run without the poison. Real broker, real PostgreSQL, the real `pipeline run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.simulate import simulate_sensors, simulate_transactions, strip_labels
from tests.service_helpers import produce, read_topic, run_processor, topic_env
from tests.sql_helpers import SqlTestStore

POISON_TIMES = ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59")


def _valid() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tx, _ = simulate_transactions(40, 30, seed=31, burst_customers=2)
    sn, _ = simulate_sensors(6, 80, seed=32, spike_devices=1)
    payments = strip_labels(tx)
    readings = strip_labels(sn)
    # the reproduction: 12 normal payments (readings) of one entity, then the poison
    payments += [{**p, "customer_id": "C-poison", "transaction_id": f"P{i}"} for i, p in enumerate(payments[:12])]
    readings += [{**r, "device_id": "pump-poison"} for r in readings[:12]]
    return payments, readings


def _poison(
    payments: list[dict[str, Any]], readings: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    pay = [
        {**payments[-1], "transaction_id": f"X{i}", "amount": 5000.0, "timestamp": t}
        for i, t in enumerate(POISON_TIMES)
    ]
    spike = {k: v * 50 for k, v in readings[-1]["values"].items()}
    read = [{**readings[-1], "values": spike, "timestamp": t} for t in POISON_TIMES]
    return pay, read


def _alerts(db: SqlTestStore, run_id: str) -> set[tuple[str, str, str, float]]:
    return {
        (a["stream"], a["entity_id"], str(a["event_time"]), float(f"{a['score']:.5g}"))
        for a in db.list_alerts(run_id=run_id)
    }


def test_out_of_range_timestamps_are_dead_lettered_and_the_service_keeps_scoring(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    payments, readings = _valid()
    bad_pay, bad_read = _poison(payments, readings)

    env = topic_env(topic_prefix, kafka_bootstrap, pg_url, run_id="poisoned")
    # the poison right after the entity's 12 valid events, then the rest of the stream goes on
    produce(kafka_bootstrap, env["PIPELINE_TRANSACTIONS_TOPIC"], [(p["customer_id"], p) for p in [*payments, *bad_pay]])
    produce(kafka_bootstrap, env["PIPELINE_SENSORS_TOPIC"], [(r["device_id"], r) for r in [*readings, *bad_read]])
    log = tmp_path / "poisoned.log"
    run_processor(env, log_path=log)  # asserts exit status 0
    run_processor(env, log_path=log)  # and a restart does not crash either (the issue: every restart did)

    ref = topic_env(f"{topic_prefix}-ref", kafka_bootstrap, pg_url, run_id="reference")
    produce(kafka_bootstrap, ref["PIPELINE_TRANSACTIONS_TOPIC"], [(p["customer_id"], p) for p in payments])
    produce(kafka_bootstrap, ref["PIPELINE_SENSORS_TOPIC"], [(r["device_id"], r) for r in readings])
    run_processor(ref, log_path=tmp_path / "reference.log")

    dead = [v for _, v in read_topic(kafka_bootstrap, env["PIPELINE_DLQ_TOPIC"])]
    assert sorted((d["reason"], d["key"]) for d in dead) == sorted(
        [("timestamp_out_of_range", "C-poison")] * 2 + [("timestamp_out_of_range", "pump-poison")] * 2
    )
    assert all("outside 1900-01-01" in d["detail"] for d in dead)
    got, want = _alerts(pg_store, "poisoned"), _alerts(pg_store, "reference")
    assert got == want
    assert {a[0] for a in want} == {"transactions", "sensors"}  # valid alerts of both streams were stored
    text = log.read_text()
    assert "Traceback" not in text and "out of range" not in text
