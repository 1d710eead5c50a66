"""faust-streaming integration on the real broker (Tansu) and PostgreSQL: a faust worker running
`pipeline.integrations.faust.scoring_agent` scores the same produced stream as `pipeline run`, and its
alerts (entity, source position, score) and dead letters equal the processor's.

Run as a script, this file is the faust worker (a subprocess of the test, as faust wants its own process)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def faust_settings(bootstrap: str) -> dict[str, object]:
    """Tansu caveats (docs/design/processor-choice.md): faust's batching producer loses records there, so
    producer_max_batch_size=1; the group timings match the processor's."""
    return dict(
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_partitions=4,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_max_batch_size=1,
        producer_acks=1,
    )


def worker_main(argv: list[str]) -> None:
    import faust

    from pipeline.app import build_scorers, ensure_models
    from pipeline.config import Settings
    from pipeline.integrations.faust import FaustScoring, scoring_agent
    from pipeline.kafka.client import KafkaDeadLetterSink
    from pipeline.sinks import Database, SqlCheckpointStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--app-id", required=True)
    ap.add_argument("--progress", required=True)
    ap.add_argument("--run-id", default="faust")
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args(argv)
    settings = Settings()  # topics, database, thresholds from the same PIPELINE_* environment as `pipeline run`
    db = Database(settings.database_url)
    db.create_schema()
    dlq = KafkaDeadLetterSink(args.bootstrap, settings.dlq_topic)
    scoring = FaustScoring(
        build_scorers(settings, ensure_models(settings)),
        SqlCheckpointStore(db),
        dlq,
        run_id=args.run_id,
        group_id=args.app_id,
    )
    app = faust.App(args.app_id, **faust_settings(args.bootstrap))  # type: ignore[arg-type]
    scoring_agent(app, scoring, batch=args.batch)

    @app.timer(0.2)
    async def report() -> None:
        tmp = args.progress + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**scoring.stats.__dict__, "t": time.time()}, f)
        os.replace(tmp, args.progress)

    faust.Worker(app, quiet=True, loglevel=os.environ.get("FAUST_LOGLEVEL", "WARNING")).execute_from_commandline()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker_main(sys.argv[1:])
    raise SystemExit(0)


pytest.importorskip("faust", reason="faust-streaming not installed (the `faust` extra)")

from pipeline.kafka.client import ensure_topics  # noqa: E402
from pipeline.simulate import simulate_sensors, simulate_transactions, strip_labels  # noqa: E402
from tests.service_helpers import produce, read_topic, run_processor, stop_processor, topic_env  # noqa: E402
from tests.sql_helpers import SqlTestStore  # noqa: E402
from tests.stream_helpers import alert_set, wait_until  # noqa: E402

BAD = [("pump-x", b"{oops"), ("pump-y", b'{"device_id": "pump-y", "timestamp": "2020-03-09T10:00:00Z", "values": {}}')]


def run_faust_worker(
    env: dict[str, str], bootstrap: str, app_id: str, expect_events: int, tmp: Path, timeout: float = 180.0
) -> dict[str, float]:
    progress = tmp / f"{app_id}.json"
    log_path = tmp / f"{app_id}.log"
    ensure_topics(bootstrap, [f"{app_id}-__assignor-__leader"], 1)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--bootstrap", bootstrap, "--app-id", app_id, "--progress", str(progress)],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    stats: dict[str, float] = {}

    def done() -> bool:
        nonlocal stats
        if proc.poll() is not None:
            raise AssertionError(f"faust worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if progress.exists():
            stats = json.loads(progress.read_text())
        return stats.get("events", 0) >= expect_events

    try:
        wait_until(done, timeout, "the faust worker to score the stream", every=0.2)
        time.sleep(0.5)  # let faust commit the acked offsets
    finally:
        stop_processor(proc, timeout=30)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]
    return stats


def test_faust_worker_alerts_equal_pipeline_run(
    kafka_bootstrap: str, pg_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    db_url = pg_store.url  # type: ignore[attr-defined]
    env = topic_env(topic_prefix, kafka_bootstrap, db_url)
    sensors, _ = simulate_sensors(10, 200, seed=5, spike_devices=3, drift_devices=2, anomaly_len=15)
    txs, _ = simulate_transactions(100, 40, seed=6, burst_customers=4)
    n_good = produce(
        kafka_bootstrap, env["PIPELINE_SENSORS_TOPIC"], ((r["device_id"], r) for r in strip_labels(sensors))
    )
    n_good += produce(
        kafka_bootstrap, env["PIPELINE_TRANSACTIONS_TOPIC"], ((r["customer_id"], r) for r in strip_labels(txs))
    )
    from pipeline.kafka.client import make_producer

    producer = make_producer(kafka_bootstrap)
    mismatched = {**strip_labels(sensors)[0], "device_id": "pump-other"}  # valid reading, key of another pump
    bad = [*BAD, (str(sensors[0]["device_id"]), json.dumps(mismatched).encode())]
    for key, value in bad:
        producer.send(env["PIPELINE_SENSORS_TOPIC"], key=key.encode(), value=value)
    producer.flush()
    producer.close()
    total = n_good + len(bad)

    run_processor(env, log_path=tmp_path / "proc.log")  # run id "live"
    expected = alert_set(pg_store, "live")
    assert len({a[0] for a in expected}) >= 3, f"the stream should raise alerts on several entities: {expected}"
    proc_dlq = sorted(v["reason"] for _, v in read_topic(kafka_bootstrap, env["PIPELINE_DLQ_TOPIC"]))

    faust_env = {**env, "PIPELINE_DLQ_TOPIC": f"{topic_prefix}-faust-dlq"}
    ensure_topics(kafka_bootstrap, [faust_env["PIPELINE_DLQ_TOPIC"]], 4)
    stats = run_faust_worker(faust_env, kafka_bootstrap, f"{topic_prefix}-faust", total, tmp_path)

    assert stats["events"] == total and stats["skipped_redelivered"] == 0
    assert stats["dead_letters"] == len(bad) and stats["scored"] == n_good
    got = alert_set(pg_store, "faust")
    assert got == expected
    assert stats["alerts"] == len(expected)
    faust_dlq = sorted(v["reason"] for _, v in read_topic(kafka_bootstrap, faust_env["PIPELINE_DLQ_TOPIC"]))
    assert faust_dlq == proc_dlq == sorted(["malformed_json", "schema_violation", "key_mismatch"])
    keys = {a["alert_key"].split("|", 1)[1] for a in pg_store.list_alerts(run_id="faust")}
    assert keys == {a["alert_key"].split("|", 1)[1] for a in pg_store.list_alerts(run_id="live")}
