#!/usr/bin/env python
"""Throughput of the two ways to run this project's scoring on the same input: `pipeline run`'s processor
(kafka-python loop, pipeline.processor) and a faust worker with pipeline.integrations.faust.scoring_agent.

Both drain the same pre-loaded topic content (pipeline bench's SensorLoad: N sensor readings over K pumps,
seed 1, an anomaly every 50 events, produced as record batches) on an embedded Tansu broker, score with the
bundled sensors model (one torch thread) and write alerts to a fresh SQLite file. events/s counts from the
first record to the moment the last record's outputs were durable (processor: the commit covering it;
faust: the end of the batch that held it). Also reported: events per CPU-second of the consuming process,
and the number of alerts (the two paths must agree).

    .venv/bin/python docs/design/faust_scoring_bench.py [--events 60000] [--entities 2000] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def worker(args: argparse.Namespace) -> None:
    import faust
    import torch

    from pipeline.app import build_scorers, ensure_models
    from pipeline.config import Settings
    from pipeline.integrations.faust import FaustScoring, scoring_agent
    from pipeline.kafka.client import KafkaDeadLetterSink
    from pipeline.sinks import Database, SqlCheckpointStore

    torch.set_num_threads(1)
    s = Settings()
    s.device, s.sensors_topic, s.database_url = "cpu", args.topic, args.db
    db = Database(s.database_url)
    db.create_schema()
    scorers = build_scorers(s, {"sensors": ensure_models(s)["sensors"]})
    scoring = FaustScoring(
        scorers,
        SqlCheckpointStore(db),
        KafkaDeadLetterSink(args.bootstrap, f"{args.topic}-dlq"),
        run_id="faust",
        group_id=args.app_id,
    )
    app = faust.App(
        args.app_id,
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_partitions=4,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_max_batch_size=1,
    )
    scoring_agent(app, scoring, batch=args.batch, within=0.1)
    cpu0: list[float] = []

    @app.timer(0.25)
    async def report() -> None:
        st = scoring.stats
        if st.first_batch_at is not None and not cpu0:
            cpu0.append(time.process_time())
        out = {**st.__dict__, "cpu_s": time.process_time() - cpu0[0] if cpu0 else 0.0}
        tmp = args.progress + ".tmp"
        Path(tmp).write_text(json.dumps(out))
        os.replace(tmp, args.progress)

    faust.Worker(app, quiet=True, loglevel="WARNING").execute_from_commandline()


def run_faust(bootstrap: str, events: int, entities: int, batch: int, tmp: str) -> dict[str, float]:
    from pipeline.bench.load import SensorLoad, produce
    from pipeline.kafka.client import ensure_topics

    topic = f"fb-{uuid.uuid4().hex[:8]}-sensors"
    app_id = f"{topic}-app"
    ensure_topics(bootstrap, [topic, f"{topic}-dlq"], 4)
    ensure_topics(bootstrap, [f"{app_id}-__assignor-__leader"], 1)
    produce(bootstrap, topic, SensorLoad(entities, seed=1, anomalous_every=50), 0, events)
    progress = f"{tmp}/{app_id}.json"
    t_start = time.time()
    with open(f"{tmp}/{app_id}.log", "wb") as log:
        p = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--bootstrap",
                bootstrap,
                "--topic",
                topic,
                "--app-id",
                app_id,
                "--db",
                f"sqlite:///{tmp}/{app_id}.db",
                "--progress",
                progress,
                "--batch",
                str(batch),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
    st: dict[str, float] = {}
    try:
        while time.time() - t_start < 600:
            if os.path.exists(progress):
                st = json.loads(Path(progress).read_text())
                if st["events"] >= events:
                    time.sleep(0.3)
                    st = json.loads(Path(progress).read_text())
                    break
            if p.poll() is not None:
                raise SystemExit(f"faust worker died: {Path(f'{tmp}/{app_id}.log').read_text()[-2000:]}")
            time.sleep(0.1)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    secs = st["last_batch_done_at"] - st["first_batch_at"]
    return {
        "events": st["events"],
        "seconds": round(secs, 2),
        "events_per_s": round(st["events"] / secs, 1),
        "events_per_cpu_s": round(st["events"] / st["cpu_s"], 1) if st.get("cpu_s") else None,
        "alerts": st["alerts"],
        "batches": st["batches"],
        "startup_s": round(st["first_batch_at"] - t_start, 1),
        "busy_share": round(st["busy_s"] / secs, 2),
    }


def run_processor(bootstrap: str, events: int, entities: int, batch: int, tmp: str) -> dict[str, float]:
    import resource

    from pipeline.bench.core import run_e2e
    from pipeline.config import Settings

    s = Settings()
    s.device = "cpu"
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    r = run_e2e(
        s,
        bootstrap,
        f"sqlite:///{tmp}/proc-{uuid.uuid4().hex[:6]}.db",
        events=events,
        entities=entities,
        rate=None,
        batch=batch,
        commit_interval_ms=200,
        fetch_max_wait_ms=20,
    )
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)  # includes producing the input
    return {
        "events": r.events,
        "seconds": round(r.seconds, 2),
        "events_per_s": round(r.events_per_s, 1),
        "cpu_s_incl_produce": round(cpu, 1),
        "alerts": r.alerts,
        "startup_s": r.extra.get("group_join_s"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--entities", type=int, default=2_000)
    ap.add_argument(
        "--batch", type=int, default=1000, help="micro-batch: processor max_batch_records, faust take_events(batch)"
    )
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--bootstrap", "--topic", "--app-id", "--db", "--progress"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import torch

    from pipeline.kafka.broker import TansuBroker

    torch.set_num_threads(1)
    broker = TansuBroker().start()
    tmp = tempfile.mkdtemp(prefix="faust-scoring-bench-")
    out = {
        "events": args.events,
        "entities": args.entities,
        "batch": args.batch,
        "cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "runs": [],
    }
    try:
        for i in range(args.runs):  # interleaved, so background load hits both alike
            pr = run_processor(broker.bootstrap, args.events, args.entities, args.batch, tmp)
            print(f"run {i + 1} processor: {json.dumps(pr)}", flush=True)
            fa = run_faust(broker.bootstrap, args.events, args.entities, args.batch, tmp)
            print(f"run {i + 1} faust:     {json.dumps(fa)}", flush=True)
            out["runs"].append({"processor": pr, "faust": fa})
    finally:
        broker.stop()
    out["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
