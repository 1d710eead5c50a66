"""Chaos in one stream (issue 11): `pipeline run` on a private Tansu broker and PostgreSQL behind a TCP
proxy gets, in order, a 3 s database cut, a kill -9, and a broker restart, then finishes the stream. Its
per-entity states, alerts, incidents, outbox messages, score samples and dead letters equal an uninterrupted
run's.

The bundled Tansu has memory storage only (its sqlite/postgres engines are not compiled in; s3 would need
an object store), so a broker restart loses the log. That is fault 4's case: the first 65% of every
entity's events are produced before the restart and processed (through the database cut and the kill,
until every partition's state has caught up with its durable position), the remaining 35% after it, into
the restarted broker's empty log. The processor must notice that the log restarted below its positions
(ERROR + offset reset to earliest) and read all of them. Offsets differ after the restart, so outputs are
compared by entity and event time."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from pipeline.kafka.broker import free_port
from pipeline.kafka.client import ensure_topics
from pipeline.kafka.client import read_topic as read_log
from pipeline.simulate import simulate_sensors, simulate_transactions, strip_labels
from tests.recovery_helpers import (
    TcpProxy,
    alert_events_of,
    assert_same_entity_states,
    db_target,
    incidents_of,
    outbox_events_of,
    proxied_url,
    same_samples,
    samples_of,
)
from tests.service_helpers import produce, run_processor, start_processor, topic_env
from tests.sql_helpers import SqlTestStore


def _positions(store: SqlTestStore, run_id: str) -> dict[tuple[str, int], int]:
    try:
        return {tp: c for tp, (c, _) in store.load_offsets(run_id, f"{run_id}-group").items()}
    except Exception:  # noqa: BLE001 - a cut database reads as "unknown"
        return {}


def _caught_up(store: SqlTestStore, run_id: str) -> int | None:
    """The durable records, once every partition's state snapshot is at its durable position; else None."""
    try:
        offsets = store.load_offsets(run_id, f"{run_id}-group")
    except Exception:  # noqa: BLE001 - a cut database reads as "unknown"
        return None
    return sum(c for c, _ in offsets.values()) if all(c == s for c, s in offsets.values()) else None


def _wait(cond: Any, timeout: float, what: str, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        assert proc is None or proc.poll() is None, f"processor exited with {proc.returncode} while waiting for {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _readyz(port: int) -> int:
    try:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _dead_letters(bootstrap: str, topic: str) -> list[tuple[str, str]]:
    out = []
    for r in read_log(bootstrap, topic):
        env = orjson.loads(r.value or b"{}")
        out.append((env["reason"], env["value"]))
    return sorted(out)


def _split(records: list[tuple[str, Any]], share: float) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The first `share` of each key's records, and the rest (per-key order kept, so per-partition order)."""
    per_key = Counter(k for k, _ in records)
    seen: Counter[str] = Counter()
    head: list[tuple[str, Any]] = []
    tail: list[tuple[str, Any]] = []
    for k, v in records:
        seen[k] += 1
        (head if seen[k] <= per_key[k] * share else tail).append((k, v))
    return head, tail


def test_kill_9_database_cut_and_broker_restart_in_one_stream(
    fresh_broker: Any, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    boot = fresh_broker.bootstrap
    tx, _ = simulate_transactions(400, 60, seed=41, burst_customers=4)
    sn, _ = simulate_sensors(20, 300, seed=42, spike_devices=1, drift_devices=1)
    payments: list[tuple[str, Any]] = []
    for i, r in enumerate(strip_labels(tx)):
        payments.append((r["customer_id"], r))
        if i % 700 == 350:  # dead letters spread over the stream
            payments.append((r["customer_id"], b'{"customer_id": "' + r["customer_id"].encode() + b'", "amount": '))
    readings = [(r["device_id"], r) for r in strip_labels(sn)]

    def run_env(run_id: str, url: str, **extra: str) -> dict[str, str]:
        env = topic_env(f"{topic_prefix}-{run_id}", boot, url)
        return {**env, "PIPELINE_RUN_ID": run_id, "PIPELINE_GROUP_ID": f"{run_id}-group", **extra}

    # reference: the whole stream, uninterrupted, on its own topics
    ref_env = run_env("reference", pg_store.url)
    produce(boot, ref_env["PIPELINE_TRANSACTIONS_TOPIC"], payments)
    produce(boot, ref_env["PIPELINE_SENSORS_TOPIC"], readings)
    run_processor(ref_env, log_path=tmp_path / "ref.log")
    ref_dead = _dead_letters(boot, ref_env["PIPELINE_DLQ_TOPIC"])

    # chaos run: the first 65% of every entity's events, then the rest after the broker restart
    proxy = TcpProxy(*db_target(pg_url)).start()
    env_c = run_env(
        "chaos",
        proxied_url(pg_url, proxy),
        PIPELINE_MAX_BATCH_RECORDS="50",
        PIPELINE_SNAPSHOT_INTERVAL_S="0.5",
        PIPELINE_COMMIT_INTERVAL_MS="50",
        PIPELINE_DB_RETRY_MAX_S="1",
    )
    tx_a, tx_b = _split(payments, 0.65)
    sn_a, sn_b = _split(readings, 0.65)
    produce(boot, env_c["PIPELINE_TRANSACTIONS_TOPIC"], tx_a)
    produce(boot, env_c["PIPELINE_SENSORS_TOPIC"], sn_a)
    part_a = len(tx_a) + len(sn_a)
    port = free_port()
    log1, log2 = tmp_path / "chaos-1.log", tmp_path / "chaos-2.log"
    proc = start_processor(env_c, "--api-port", str(port), log_path=log1)
    try:
        # 1. database cut: the service waits, reports not ready, does not exit; ready again after
        _wait(lambda: sum(_positions(pg_store, "chaos").values()) > part_a * 0.15, 90, "15% durable", proc)
        _wait(lambda: _readyz(port) == 200, 30, "ready", proc)
        proxy.cut()
        _wait(lambda: _readyz(port) == 503, 10, "not ready during the cut", proc)
        time.sleep(3.0)
        assert proc.poll() is None and _readyz(port) == 503
        proxy.restore()
        _wait(lambda: _readyz(port) == 200, 30, "ready after the cut", proc)
        # 2. kill -9 mid-stream, restart
        _wait(lambda: sum(_positions(pg_store, "chaos").values()) > part_a * 0.5, 90, "half durable", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = sum(_positions(pg_store, "chaos").values())
        assert killed_at < part_a, "the kill landed after the stream"
        proc = start_processor(env_c, "--api-port", str(port), log_path=log2)
        # 3. broker restart once the first part is durable and every partition's state has caught up with it
        # (the restart's replay from an older snapshot is over): its memory log is lost; the stream goes on.
        # A restart during that replay takes the records the state still needs (an ERROR says how many:
        # tests/unit/test_review_fixes.py), which no comparison with the reference could pass.
        _wait(lambda: _caught_up(pg_store, "chaos") == part_a, 90, "first part durable, state caught up", proc)
        fresh_broker.stop(kill=True)
        time.sleep(2.0)
        fresh_broker.start()
        ensure_topics(boot, [env_c[f"PIPELINE_{t}_TOPIC"] for t in ("TRANSACTIONS", "SENSORS", "DLQ", "ALERTS")], 4)
        produce(boot, env_c["PIPELINE_TRANSACTIONS_TOPIC"], tx_b)
        produce(boot, env_c["PIPELINE_SENSORS_TOPIC"], sn_b)
        # every partition's log restarted at 0, shorter than the stored positions: reset to earliest, read all
        _wait(lambda: sum(_positions(pg_store, "chaos").values()) == len(tx_b) + len(sn_b), 90, "rest durable", proc)
        _wait(lambda: _readyz(port) == 200, 30, "ready at the end", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    text = log1.read_text() + log2.read_text()
    assert "retrying" in text
    assert "past the end of the broker's log" in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if " ERROR pipeline" in ln or " CRITICAL " in ln]
    assert all("offset reset policy" in ln for ln in errors), errors[:5]  # the reset's ERRORs, nothing else

    assert_same_entity_states(pg_store, "reference", "chaos")
    ref, got = alert_events_of(pg_store, "reference"), alert_events_of(pg_store, "chaos")
    assert ref and set(ref) == set(got), f"alerts differ: {sorted(set(ref) ^ set(got))[:4]}"
    assert all(abs(got[k] - ref[k]) <= 1e-4 * max(1.0, ref[k]) for k in ref)
    inc_ref, inc_got = incidents_of(pg_store, "reference"), incidents_of(pg_store, "chaos")
    assert inc_ref and inc_ref == inc_got, f"incidents differ: {sorted(inc_ref ^ inc_got)[:4]}"
    out_ref, out_got = outbox_events_of(pg_store, "reference"), outbox_events_of(pg_store, "chaos")
    assert out_ref and out_ref == out_got, f"outbox differs: {len(out_ref)} vs {len(out_got)}"
    sam_ref, sam_got = samples_of(pg_store, "reference"), samples_of(pg_store, "chaos")
    assert sam_ref and same_samples(sam_ref, sam_got), f"score samples differ: {len(sam_ref)} vs {len(sam_got)}"
    # dead letters sent before the restart went with the broker's memory; those of the second part are all
    # there, once each, exactly as in the reference
    bad_b = {v.decode() for _, v in tx_b if isinstance(v, bytes)}
    got_dead = _dead_letters(boot, env_c["PIPELINE_DLQ_TOPIC"])
    assert bad_b and got_dead == [d for d in ref_dead if d[1] in bad_b]
