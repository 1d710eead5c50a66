"""The whole service as users run it: `pipeline run` processes on the real broker and real PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import text

from pipeline.simulate import simulate_sensors, simulate_transactions, strip_labels
from tests.recovery_helpers import (
    OffsetWatch,
    assert_same_entity_states,
    dead_letters_of,
    incidents_of,
    outbox_of,
    same_samples,
    samples_of,
)
from tests.service_helpers import produce, run_processor, start_processor, topic_env
from tests.sql_helpers import SqlTestStore


def _produce_scenario(
    bootstrap: str,
    env: dict[str, str],
    customers: int = 300,
    devices: int = 20,
    bad_every: int | None = None,
    bursts: int = 3,
) -> tuple[set, set]:
    """bad_every: also a malformed record (dead letter) after every `bad_every`-th payment, spread over the log;
    bursts: customers with an injected burst of large payments."""
    tx, tx_inj = simulate_transactions(customers, 60, seed=21, burst_customers=bursts)
    sn, sn_inj = simulate_sensors(devices, 300, seed=22, spike_devices=1, drift_devices=1)
    payments: list[tuple[str, object]] = []
    for i, r in enumerate(strip_labels(tx)):
        payments.append((r["customer_id"], r))
        if bad_every and i % bad_every == bad_every // 2:
            payments.append((r["customer_id"], b'{"customer_id": "' + r["customer_id"].encode() + b'", "amount": '))
    produce(bootstrap, env["PIPELINE_TRANSACTIONS_TOPIC"], payments)
    produce(bootstrap, env["PIPELINE_SENSORS_TOPIC"], ((r["device_id"], r) for r in strip_labels(sn)))
    return set(tx_inj.entities), set(sn_inj.entities)


def test_injected_anomalies_alerted_and_normal_entities_not(
    kafka_bootstrap: str, pg_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    env = topic_env(topic_prefix, kafka_bootstrap, pg_store.url)
    tx_bad, sn_bad = _produce_scenario(kafka_bootstrap, env)
    run_processor(env, log_path=tmp_path / "proc.log")
    alerts = pg_store.list_alerts(run_id="live")
    assert {a["entity_id"] for a in alerts if a["stream"] == "transactions"} == tx_bad
    assert {a["entity_id"] for a in alerts if a["stream"] == "sensors"} == sn_bad
    for a in alerts:
        assert a["score"] > a["threshold"] > 0
        assert a["model_version"] and a["top_features"] and a["source_offset"] >= 0
        assert a["source_topic"] in (env["PIPELINE_TRANSACTIONS_TOPIC"], env["PIPELINE_SENSORS_TOPIC"])
        f = a["top_features"][0]
        assert set(f) == {"feature", "observed", "reconstructed", "contribution"}
    # the burst cards are flagged on the amount, the pumps on physical channels
    tx_top = {a["top_features"][0]["feature"] for a in alerts if a["stream"] == "transactions"}
    assert "log_amount" in tx_top


def _committed(store: SqlTestStore, run_id: str) -> tuple[int, bool]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT committed_offset, snapshot_offset FROM partition_checkpoints WHERE run_id = :r"), {"r": run_id}
        ).all()
    return sum(r.committed_offset for r in rows), any(r.snapshot_offset for r in rows)


def _run_env(env: dict[str, str], prefix: str, run_id: str, **extra: str) -> dict[str, str]:
    """A run in its own namespace: run id, group, dead-letter and alerts topics."""
    return {
        **env,
        "PIPELINE_RUN_ID": run_id,
        "PIPELINE_GROUP_ID": f"{prefix}-{run_id}",
        "PIPELINE_DLQ_TOPIC": f"{prefix}-{run_id}-dlq",
        "PIPELINE_ALERTS_TOPIC": f"{prefix}-{run_id}-alerts",
        **extra,
    }


def _kill_when(proc: subprocess.Popen[bytes], store: SqlTestStore, run_id: str, above: int, total: int) -> int:
    """SIGKILL once a state snapshot exists and more than `above` events are durable; returns that count."""
    deadline = time.monotonic() + 120
    committed, snapped = 0, False
    while time.monotonic() < deadline and proc.poll() is None:
        committed, snapped = _committed(store, run_id)
        if snapped and committed > above:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert snapped and above < committed < total, f"kill landed outside the stream: committed {committed}/{total}"
    return committed


def assert_same_outputs(
    store: SqlTestStore,
    bootstrap: str,
    env_a: dict[str, str],
    env_b: dict[str, str],
    durable_at_kills: list[dict[tuple[str, int], int]],
) -> None:
    """Incidents, outbox messages and score samples of two runs are equal (as multisets); so are their dead
    letters, except that a record not yet durable at a kill (at or after its partition's committed offset
    then) may have been dead-lettered twice, under the same key: the dead-letter topic is at-least-once
    across a crash. Nothing below a durable position is ever sent again."""
    a, b = env_a["PIPELINE_RUN_ID"], env_b["PIPELINE_RUN_ID"]
    inc_a, inc_b = incidents_of(store, a), incidents_of(store, b)
    assert inc_a and inc_a == inc_b, f"incidents differ: {sorted(inc_a ^ inc_b)[:4]}"
    out_a, out_b = outbox_of(store, a), outbox_of(store, b)
    assert out_a and out_a == out_b, f"outbox differs: {len(out_a)} vs {len(out_b)}"
    for _, event, resolved in out_b:
        assert event != "resolved" or resolved is not None
    sam_a, sam_b = samples_of(store, a), samples_of(store, b)
    assert sam_a and same_samples(sam_a, sam_b), f"score samples differ: {len(sam_a)} vs {len(sam_b)}"
    dl_a = dead_letters_of(bootstrap, env_a["PIPELINE_DLQ_TOPIC"])
    dl_b = dead_letters_of(bootstrap, env_b["PIPELINE_DLQ_TOPIC"])
    assert dl_a and sorted(set(dl_a)) == dl_a and set(dl_a) == set(dl_b), "dead letters lost or spurious"
    for d, n in Counter(dl_b).items():
        if n > 1:  # re-sent: only allowed for a record that was past the durable position at some kill
            assert n - 1 <= len(durable_at_kills) and any(d[2] >= k.get((d[0], d[1]), 0) for k in durable_at_kills), (
                f"dead letter {d} sent {n} times although it was below a durable position"
            )


def _durable_positions(store: SqlTestStore, run_id: str) -> dict[tuple[str, int], int]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT topic, partition, committed_offset FROM partition_checkpoints WHERE run_id = :r"),
            {"r": run_id},
        ).all()
    return {(r.topic, r.partition): r.committed_offset for r in rows}


def test_kill_9_mid_stream_loses_nothing_duplicates_nothing_restores_state(
    kafka_bootstrap: str, pg_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    """Killed twice mid-stream: alerts, per-entity state, incidents, outbox messages, score samples and dead
    letters equal an uninterrupted run's, and no partition's committed offset ever moves backwards."""

    env = topic_env(topic_prefix, kafka_bootstrap, pg_store.url)
    _produce_scenario(kafka_bootstrap, env, customers=600, devices=30, bad_every=1000, bursts=60)
    total = 600 * 60 + 30 * 300 + 36

    # reference: one uninterrupted run in its own namespace and group
    ref_env = _run_env(env, topic_prefix, "reference")
    run_processor(ref_env, log_path=tmp_path / "ref.log")

    # crash run: small batches and frequent snapshots, killed -9 twice in the middle
    crash_env = _run_env(
        env,
        topic_prefix,
        "crash",
        PIPELINE_MAX_BATCH_RECORDS="100",
        PIPELINE_SNAPSHOT_INTERVAL_S="0.5",
        PIPELINE_COMMIT_INTERVAL_MS="50",
    )
    watch = OffsetWatch(pg_store, "crash").start()
    try:
        proc = start_processor(crash_env, log_path=tmp_path / "crash-1.log")
        first = _kill_when(proc, pg_store, "crash", int(total * 0.3), total)
        durable_at_kills = [_durable_positions(pg_store, "crash")]
        alerts_at_kill = {a["alert_key"] for a in pg_store.list_alerts(run_id="crash")}
        proc = start_processor(crash_env, log_path=tmp_path / "crash-2.log")
        _kill_when(proc, pg_store, "crash", max(first + 2000, int(total * 0.6)), total)
        durable_at_kills.append(_durable_positions(pg_store, "crash"))
        run_processor(crash_env, log_path=tmp_path / "crash-3.log")
    finally:
        watch.stop()
    assert _committed(pg_store, "crash")[0] == total
    assert watch.samples > 20 and not watch.backwards, f"committed_offset moved backwards: {watch.backwards[:5]}"
    assert_same_outputs(pg_store, kafka_bootstrap, ref_env, crash_env, durable_at_kills)

    def pos(a: dict) -> tuple:
        return (a["source_topic"], a["source_partition"], a["source_offset"])

    ref = {pos(a): a for a in pg_store.list_alerts(run_id="reference")}
    got_list = pg_store.list_alerts(run_id="crash")
    got = {pos(a): a for a in got_list}
    assert len(got_list) == len(got), "duplicated alerts"
    assert alerts_at_kill <= {a["alert_key"] for a in got_list}, "an alert durable before the kill was lost"
    assert set(got) == set(ref), "alerts differ from the uninterrupted run"
    for k in ref:
        assert abs(got[k]["score"] - ref[k]["score"]) <= 1e-4 * max(1.0, ref[k]["score"])

    # per-entity state after restart equals the uninterrupted run's
    assert_same_entity_states(pg_store, "reference", "crash")


def test_sigterm_checkpoints_and_exits_cleanly(
    kafka_bootstrap: str, sqlite_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    env = topic_env(topic_prefix, kafka_bootstrap, sqlite_store.url, log_json="true")
    sn, _ = simulate_sensors(10, 100, seed=5)
    produce(kafka_bootstrap, env["PIPELINE_SENSORS_TOPIC"], ((r["device_id"], r) for r in strip_labels(sn)))
    log = tmp_path / "proc.log"
    proc = start_processor(env, log_path=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _committed(sqlite_store, "live")[0] < 1000:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    committed, snapped = _committed(sqlite_store, "live")
    assert committed == 1000 and snapped  # the final checkpoint took a state snapshot
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    import json

    events = [json.loads(ln) for ln in lines]
    assert any("signal 15" in e["msg"] for e in events)
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in events)


def test_run_serves_api_and_live_metrics(
    kafka_bootstrap: str, sqlite_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    import urllib.request

    from pipeline.kafka.broker import free_port

    env = topic_env(topic_prefix, kafka_bootstrap, sqlite_store.url)
    sn, _ = simulate_sensors(5, 60, seed=6)
    produce(kafka_bootstrap, env["PIPELINE_SENSORS_TOPIC"], ((r["device_id"], r) for r in strip_labels(sn)))
    port = free_port()
    proc = start_processor(env, "--api-port", str(port), log_path=tmp_path / "proc.log")
    try:
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                body = ""
            if 'pipeline_events_total{stream="sensors"} 300.0' in body:
                break
            time.sleep(0.2)
        assert 'pipeline_events_total{stream="sensors"} 300.0' in body, (tmp_path / "proc.log").read_text()[-2000:]
        assert "pipeline_live_entities" in body and "pipeline_batch_size_bucket" in body
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
        assert health.status == 200
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
        assert "<html" in page.lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
