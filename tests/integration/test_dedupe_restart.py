"""Issue 11, fault 5 (duplicates): an at-least-once producer resends a payment (same transaction_id); it must
be scored once, also when the resend arrives after a crash (the restart replays from the last snapshot and
rebuilds the dedupe window) or after a clean restart (the window is restored from the partition snapshot).
Real broker, real PostgreSQL, the real `pipeline run`."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from pipeline.simulate import simulate_transactions, strip_labels
from tests.service_helpers import produce, read_topic, run_processor, start_processor, topic_env
from tests.sql_helpers import SqlTestStore


def _stream() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    tx, _ = simulate_transactions(20, 20, seed=41)
    payments = strip_labels(tx)
    normal = [
        {**p, "customer_id": "C-dup", "transaction_id": f"D{i}", "amount": 20.0 + i % 3}
        for i, p in enumerate(payments[:12])
    ]
    big = {
        **normal[-1],
        "transaction_id": "DUP-1",
        "amount": 5000.0,
        "timestamp": normal[-1]["timestamp"][:11] + "23:59:00Z",
    }
    return [*payments, *normal, big], big


def _dropped(log: Path) -> list[int]:
    return [int(n) for n in re.findall(r"(\d+) duplicates dropped", log.read_text())]


def _alerts_of(db: SqlTestStore, run_id: str, entity: str) -> list[dict[str, Any]]:
    return [a for a in db.list_alerts(run_id=run_id) if a["entity_id"] == entity]


def test_a_resent_payment_is_scored_once_across_crash_and_restart(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    stream, big = _stream()
    env = topic_env(topic_prefix, kafka_bootstrap, pg_url, run_id="dedupe", snapshot_interval_s=3600)
    topic = env["PIPELINE_TRANSACTIONS_TOPIC"]
    produce(kafka_bootstrap, topic, [(p["customer_id"], p) for p in stream])
    log = tmp_path / "proc.log"

    # 1. everything durable, no state snapshot yet (interval 1 h), then kill -9: the restart replays from 0
    proc = start_processor(env, log_path=log)
    try:
        deadline = time.monotonic() + 120
        while sum(c for c, _ in pg_store.load_offsets("dedupe", env["PIPELINE_GROUP_ID"]).values()) < len(stream):
            assert time.monotonic() < deadline, "first part never became durable"
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait(30)
    assert len(_alerts_of(pg_store, "dedupe", "C-dup")) == 1  # the 5,000 payment is an anomaly

    # 2. the producer resends it; the restart rebuilds the window while replaying, and drops the resend
    produce(kafka_bootstrap, topic, [(big["customer_id"], big)])
    run_processor(env, log_path=log)  # graceful exit: a final snapshot, dedupe window included
    assert _dropped(log) == [1]

    # 3. resent once more after a clean restart: the window comes back from the partition snapshot
    produce(kafka_bootstrap, topic, [(big["customer_id"], big)])
    run_processor(env, log_path=log)
    assert _dropped(log) == [1, 1]
    assert len(_alerts_of(pg_store, "dedupe", "C-dup")) == 1
    rows = pg_store.load_states("dedupe", "transactions", [f"#dedupe:{p}" for p in range(4)])
    assert any(b'"DUP-1"' in blob for blob in rows.values())

    # control: without deduplication the resends are scored again and raise more alerts
    off = topic_env(f"{topic_prefix}-off", kafka_bootstrap, pg_url, run_id="no-dedupe", dedupe_window=0)
    produce(kafka_bootstrap, off["PIPELINE_TRANSACTIONS_TOPIC"], [(p["customer_id"], p) for p in [*stream, big, big]])
    run_processor(off, log_path=tmp_path / "off.log")
    assert len(_alerts_of(pg_store, "no-dedupe", "C-dup")) > 1


def test_a_transaction_id_with_a_nul_character_is_scored_deduped_and_snapshotted_on_postgresql(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The schema leaves transaction_id free text, and PostgreSQL rejects NUL in text columns; the id only
    reaches the database inside the dedupe window's snapshot (bytea), so such a payment is scored, alerted,
    snapshotted and its resend dropped, like any other."""
    stream, big = _stream()
    big = {**big, "transaction_id": "DUP\u00001"}
    env = topic_env(topic_prefix, kafka_bootstrap, pg_url, run_id="nul-id")
    topic = env["PIPELINE_TRANSACTIONS_TOPIC"]
    produce(kafka_bootstrap, topic, [(p["customer_id"], p) for p in [*stream[:-1], big]])
    log = tmp_path / "proc.log"
    run_processor(env, log_path=log)
    assert len(_alerts_of(pg_store, "nul-id", "C-dup")) == 1
    rows = pg_store.load_states("nul-id", "transactions", [f"#dedupe:{p}" for p in range(4)])
    assert any(b'"DUP\\u00001"' in blob for blob in rows.values())
    produce(kafka_bootstrap, topic, [(big["customer_id"], big)])
    run_processor(env, log_path=log)
    assert _dropped(log) == [0, 1]
    assert len(_alerts_of(pg_store, "nul-id", "C-dup")) == 1


def test_a_payment_dead_lettered_out_of_order_is_scored_when_resent_corrected(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    """A probe's payment sent with a clock three days behind its card went to the dead letters as out_of_order,
    and its corrected resend (same transaction_id) was then dropped as a duplicate of a payment never scored."""
    stream, big = _stream()
    behind = {**big, "timestamp": big["timestamp"][:11] + "00:00:00Z"}  # hours behind the card's latest payment
    env = topic_env(topic_prefix, kafka_bootstrap, pg_url, run_id="ooo-resend")
    topic = env["PIPELINE_TRANSACTIONS_TOPIC"]
    produce(kafka_bootstrap, topic, [(p["customer_id"], p) for p in [*stream[:-1], behind]])
    log = tmp_path / "proc.log"
    run_processor(env, log_path=log)
    assert [d["reason"] for _, d in read_topic(kafka_bootstrap, env["PIPELINE_DLQ_TOPIC"])] == ["out_of_order"]
    assert _alerts_of(pg_store, "ooo-resend", "C-dup") == []
    produce(kafka_bootstrap, topic, [(big["customer_id"], big)])  # the producer fixes its clock and resends
    run_processor(env, log_path=log)
    assert _dropped(log) == [0, 0]
    assert len(_alerts_of(pg_store, "ooo-resend", "C-dup")) == 1


def test_a_resent_sensor_reading_is_scored_once_and_counted(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    """A probe resent one reading (same device, time and values, as an at-least-once producer does): it raised
    a second alert with another score (the first had moved the entity's state) and nothing counted it. Now a
    reading is deduplicated by device, time and values; a different reading stamped with the same time is
    still scored."""
    from pipeline.simulate import simulate_sensors

    recs, _ = simulate_sensors(4, 120, seed=43)
    readings = strip_labels(recs)
    last = max((r for r in readings if r["device_id"] == readings[0]["device_id"]), key=lambda r: r["timestamp"])
    spike = {
        **last,
        "timestamp": last["timestamp"][:11] + "23:59:00Z",
        "values": {k: v * 40 for k, v in last["values"].items()},
    }
    twin = {**spike, "values": {**spike["values"], next(iter(spike["values"])): 0.5}}  # same time, other values
    env = topic_env(topic_prefix, kafka_bootstrap, pg_url, run_id="sdedupe")
    topic = env["PIPELINE_SENSORS_TOPIC"]
    produce(kafka_bootstrap, topic, [(r["device_id"], r) for r in [*readings, spike, spike, twin]])
    log = tmp_path / "proc.log"
    run_processor(env, log_path=log)
    assert _dropped(log) == [1]
    offsets = sorted(
        a["source_offset"] for a in _alerts_of(pg_store, "sdedupe", spike["device_id"]) if a["event_time"].hour == 23
    )
    assert offsets, "the spike raised no alert"
    assert offsets[0] + 1 not in offsets  # its resend, the next record of the partition, raised none
    scored = pg_store.load_offsets("sdedupe", env["PIPELINE_GROUP_ID"])
    assert sum(c for c, _ in scored.values()) == len(readings) + 3  # all consumed, the resend included
