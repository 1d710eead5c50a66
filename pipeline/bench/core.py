"""`pipeline bench`: end-to-end throughput and latency on the local broker, scorer-only throughput,
peers (River HalfSpaceTrees per entity; a naive unbatched per-event LSTM loop), memory per entity,
and an optional soak. All measured in one run, on the same synthetic sensor events (8 channels,
window 32: the sensors model).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.lstm_ae import model_chunk
from pipeline.bench.load import SensorLoad
from pipeline.config import Settings
from pipeline.features.streams import EventColumns
from pipeline.processor import Processor, ProcessorOptions
from pipeline.records import RawRecord, TopicPartition
from pipeline.scoring.factory import build_scorer
from pipeline.scoring.scorer import StreamScorer

log = logging.getLogger(__name__)
PARTITIONS = 4


# -- environment ------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sensor_scorer(settings: Settings, device: str = "cpu", *, version_suffix: str = "") -> StreamScorer:
    """The service's sensors scorer (its model, knobs and precision) on `device`. version_suffix: a copy of the
    model loaded on its own, reporting its own version (the shadow run's challenger)."""
    from pipeline.app import ensure_models

    checkpoint = ensure_models(settings)["sensors"]
    if version_suffix:
        checkpoint = replace(checkpoint, card={**checkpoint.card, "version": checkpoint.version + version_suffix})
    return build_scorer(
        "sensors",
        checkpoint,
        channels=settings.sensor_channels,
        knobs=settings.threshold,
        device=device,
        precision=settings.precision,
        allowed_lateness_s=settings.allowed_lateness_s,
        max_message_bytes=settings.max_message_bytes,
    )


def columns(load: SensorLoad, start: int, n: int) -> EventColumns:
    dev, ts, vals = load.arrays(start, n)
    return EventColumns([load.ids[d] for d in dev.tolist()], ts, vals)


# -- scorer only, naive loop, River --------------------------------------------------------------------------
def bench_scorer(
    settings: Settings, load: SensorLoad, *, device: str = "cpu", batch: int = 5000, seconds: float = 8.0
) -> dict[str, Any]:
    """StreamScorer.process on pre-built EventColumns batches (no Kafka, no decode, no DB)."""
    scorer = sensor_scorer(settings, device)
    k = load.k
    warm = columns(load, 0, k)  # every entity once (slots allocated, windows filled)
    scorer.process(warm)
    batches = [columns(load, k + i * batch, batch) for i in range(max(1, int(2 * k / batch)))]
    n = 0
    calls = 0
    model_s = 0.0
    chunk = model_chunk(scorer.device)
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds or i < len(batches):
        p = scorer.prepare(batches[i % len(batches)])
        calls += -(-len(p.slots) // chunk)
        m0 = time.perf_counter()
        scorer.checkpoint.score(p.windows, scorer.device)  # type: ignore[union-attr]
        if scorer.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        model_s += time.perf_counter() - m0
        n += len(p.slots)
        i += 1
    elapsed = time.perf_counter() - t0
    # the full process() path (prepare + model + thresholds) on the same batches
    t1 = time.perf_counter()
    m = 0
    for b in batches:
        m += len(scorer.process(b).scores)
    full = m / (time.perf_counter() - t1)
    return {
        "device": str(scorer.device),
        "batch": batch,
        "windows": n,
        "precision": scorer.checkpoint.precision,  # type: ignore[union-attr]  # effective (after fallback)
        "windows_per_s": full,
        "prepare_plus_model_windows_per_s": n / elapsed,
        "model_only_windows_per_s": n / model_s if model_s else None,
        "model_share_of_time": model_s / elapsed,
        # how full the LSTM's calls are: windows per call / the device's chunk size (a GPU stays busy
        # only with full chunks, so the service's max_batch_records should be >= the chunk there)
        "model_chunk": chunk,
        "batch_fill": n / (calls * chunk) if calls else None,
    }


def bench_naive(settings: Settings, load: SensorLoad, *, events: int = 3000) -> dict[str, Any]:
    """The same scorer fed one event at a time: state update + an LSTM forward on a batch of 1 per event."""
    scorer = sensor_scorer(settings)
    k = min(load.k, 1000)
    sub = SensorLoad(k, seed=1)
    scorer.process(columns(sub, 0, k))
    cols = columns(sub, k, events)
    t0 = time.perf_counter()
    for i in range(events):
        scorer.process(EventColumns([cols.entity_ids[i]], cols.ts[i : i + 1], cols.base[i : i + 1]))
    dt = time.perf_counter() - t0
    return {"events": events, "events_per_s": events / dt}


def bench_river(
    load: SensorLoad,
    *,
    entities: int = 1000,
    events: int = 20000,
    n_trees: int = 10,
    height: int = 8,
    window_size: int = 32,
) -> dict[str, Any]:
    """River HalfSpaceTrees per entity (dict of models), score_one then learn_one per event."""
    from river.anomaly import HalfSpaceTrees

    from pipeline.bench.load import _AMP, _BASE, _NOISE
    from pipeline.simulate import SENSOR_CHANNELS

    lo, hi = _BASE * 0.85 - 2 * _AMP - 6 * _NOISE, _BASE * 1.15 + 2 * _AMP + 6 * _NOISE
    limits: dict[Hashable, tuple[float, float]] = {
        c: (float(a), float(b)) for c, a, b in zip(SENSOR_CHANNELS, lo, hi, strict=True)
    }
    sub = SensorLoad(entities, seed=1)
    dev, _, vals = sub.arrays(0, events)
    rows = [dict(zip(SENSOR_CHANNELS, v, strict=True)) for v in vals.tolist()]
    t0 = time.perf_counter()
    models = {
        d: HalfSpaceTrees(n_trees=n_trees, height=height, window_size=window_size, limits=limits, seed=d)
        for d in range(entities)
    }
    created = time.perf_counter() - t0
    t0 = time.perf_counter()
    for d, x in zip(dev.tolist(), rows, strict=True):
        m = models[d]
        m.score_one(x)
        m.learn_one(x)
    dt = time.perf_counter() - t0
    return {
        "entities": entities,
        "events": events,
        "events_per_s": events / dt,
        "model_create_ms_per_entity": 1000 * created / entities,
        "config": {"n_trees": n_trees, "height": height, "window_size": window_size},
        "note": "model cost only: pre-decoded dicts, no Kafka/DB; entity models created beforehand",
    }


def bench_memory(settings: Settings, entities: int) -> dict[str, Any]:
    """Bytes per live entity in the state store: tracemalloc over creating `entities` states (one event
    each), vs an empty store; also the fixed per-slot array bytes and the snapshot blob size."""
    scorer = sensor_scorer(settings)
    load = SensorLoad(entities, seed=2)
    cols = columns(load, 0, entities)
    store = scorer.store
    preallocated = store.capacity  # slots the store allocated before tracing started
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    scorer.process(cols)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    # a store that grew allocated all its arrays again while traced; one that did not holds its entities in
    # the slots allocated before (which tracing did not see: 35 B per entity was printed for 300 entities)
    untraced = store.nbytes_per_entity() * preallocated if store.capacity == preallocated else 0.0
    layout = store.layout
    return {
        "entities": entities,
        "window": layout.window,
        "features": layout.n_features,
        "bytes_per_entity": (after - before + untraced) / entities,
        "array_bytes_per_slot": store.nbytes_per_entity(),
        "capacity_slots": store.capacity,
        "snapshot_blob_bytes": layout.blob_size,
    }


# -- end to end ---------------------------------------------------------------------------------------------
class TimedSource:
    """Wraps the real KafkaSource: per-partition (offset, record timestamp) of the records handed to the
    processor and not yet committed, and on every commit (the checkpointer commits only after the DB
    transaction, so a commit time is the moment those records' outputs became durable) the latency of
    each newly durable record goes into a fixed 1 ms histogram. Bench-only bookkeeping, bounded memory."""

    MAX_MS = 120_000

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.first_record_at: float | None = None
        self.pending: dict[TopicPartition, list[np.ndarray]] = {}
        self.hist = np.zeros(self.MAX_MS + 1, np.int64)
        self.commits: list[tuple[float, int]] = []  # (time, total committed offsets)
        self._committed: dict[TopicPartition, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def subscribe(self, topics: Sequence[str], on_assigned: Any, on_revoked: Any) -> None:
        self.inner.subscribe(topics, on_assigned, on_revoked)

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        recs: list[RawRecord] = self.inner.poll(timeout_ms, max_records)
        if recs:
            if self.first_record_at is None:
                self.first_record_at = time.time()
            arr = np.array([(r.partition, r.offset, r.timestamp_ms) for r in recs], np.int64)
            topic = recs[0].topic
            for p in np.unique(arr[:, 0]).tolist():
                self.pending.setdefault((topic, p), []).append(arr[arr[:, 0] == p, 1:])
        return recs

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.inner.commit(offsets)
        now_ms = time.time() * 1000.0
        for tp, off in offsets.items():
            chunks = self.pending.get(tp)
            if not chunks:
                continue
            rec = np.concatenate(chunks)
            done = rec[:, 0] < off
            lat = np.clip(np.rint(now_ms - rec[done, 1]), 0, self.MAX_MS).astype(np.int64)
            self.hist += np.bincount(lat, minlength=self.MAX_MS + 1)
            self.pending[tp] = [rec[~done]] if (~done).any() else []
        self._committed.update(offsets)
        self.commits.append((time.time(), sum(self._committed.values())))

    def latency_pcts(self) -> dict[str, float]:
        n = int(self.hist.sum())
        if n == 0:
            return {}
        cdf = np.cumsum(self.hist)

        def q(x: float) -> float:
            return float(np.searchsorted(cdf, x * n))

        return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": float(np.flatnonzero(self.hist)[-1]), "n": n}

    def last_commit_covering(self, events: int) -> float | None:
        for t, total in self.commits:
            if total >= events:
                return t
        return None


@dataclass
class E2EResult:
    events: int
    seconds: float
    events_per_s: float
    latency_ms: dict[str, float]
    alerts: int
    checkpoints: int
    live_entities: int
    rss_mb: float
    mode: str
    rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _build(
    settings: Settings,
    bootstrap: str,
    topic: str,
    db_url: str,
    group: str,
    opts: ProcessorOptions,
    fetch_max_wait_ms: int = 500,
    shadow: bool = False,
) -> tuple[Processor, TimedSource, Any, Any]:
    from pipeline.kafka.client import KafkaDeadLetterSink, KafkaSource, ensure_topics
    from pipeline.sinks import Database, SqlCheckpointStore

    db = Database(db_url)
    db.create_schema()
    ensure_topics(bootstrap, [topic, f"{topic}-dlq"], PARTITIONS)
    scorer = sensor_scorer(settings)
    src = TimedSource(
        KafkaSource(
            bootstrap, group, session_timeout_ms=6000, heartbeat_interval_ms=1000, fetch_max_wait_ms=fetch_max_wait_ms
        )
    )
    dlq = KafkaDeadLetterSink(bootstrap, f"{topic}-dlq")
    challengers = {topic: sensor_scorer(settings, version_suffix="-challenger")} if shadow else None
    proc = Processor(src, SqlCheckpointStore(db), dlq, {topic: scorer}, opts, challengers=challengers)
    return proc, src, dlq, db


def run_e2e(
    settings: Settings,
    bootstrap: str,
    db_url: str,
    *,
    events: int,
    entities: int,
    rate: float | None,
    duration_s: float | None = None,
    soak_sample_s: float = 5.0,
    batch: int = 5000,
    commit_interval_ms: int = 200,
    snapshot_interval_s: float = 10.0,
    fetch_max_wait_ms: int = 500,
    shadow: bool = False,
    progress: Callable[[str], None] | None = None,
) -> E2EResult:
    """rate=None: 'drain' -- produce everything first, then time the processor from its first record to
    the durable commit covering the last event (capacity). rate=R: 'paced' -- a producer process sends
    R events/s while the processor runs; per-event latency = durable-commit time - producer timestamp.
    duration_s (paced) turns it into a soak: RSS sampled every soak_sample_s. shadow: a second copy of the
    model scores every event as the stream's challenger (shadow alerts and samples in each checkpoint)."""
    from pipeline.bench.load import produce

    topic = f"bench-{uuid.uuid4().hex[:8]}-sensors"
    group = f"{topic}-g"
    opts = ProcessorOptions(
        run_id=f"bench-{uuid.uuid4().hex[:6]}",
        group_id=group,
        max_batch_records=batch,
        poll_timeout_ms=20,
        commit_interval_ms=commit_interval_ms,
        snapshot_interval_s=snapshot_interval_s,
        entity_ttl_s=3600.0,
    )
    proc, src, dlq, db = _build(settings, bootstrap, topic, db_url, group, opts, fetch_max_wait_ms, shadow)
    load = SensorLoad(entities, seed=1, anomalous_every=50)
    producer: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    rss_samples: list[tuple[float, int, int]] = []
    if rate is None:
        if progress:
            progress(f"producing {events} events ...")
        produce(bootstrap, topic, load, 0, events)
        if progress:
            progress("processing ...")
    thread = threading.Thread(
        target=proc.run, args=(stop,), kwargs={"max_events": None if duration_s else events}, daemon=True
    )
    t_start = time.time()
    thread.start()
    try:
        if rate is not None:
            proc.ready.wait(60)
            time.sleep(0.5)
            cmd = [
                sys.executable,
                "-m",
                "pipeline.bench.load",
                "--bootstrap",
                bootstrap,
                "--topic",
                topic,
                "--entities",
                str(entities),
                "--rate",
                str(rate),
                "--events",
                str(events),
            ]
            if duration_s:
                cmd += ["--duration", str(duration_s), "--events", str(10**12)]
            producer = subprocess.Popen(cmd, stdout=subprocess.PIPE, env={**os.environ})  # noqa: S603 - our own interpreter, an argument list
            if progress:
                progress(f"producer sending {rate:.0f}/s ...")
            next_sample = time.monotonic()
            while producer.poll() is None:
                if time.monotonic() >= next_sample:
                    rss_samples.append((time.monotonic(), rss_bytes(), proc.stats.events))
                    next_sample += soak_sample_s
                time.sleep(0.2)
            out = (producer.stdout.read() if producer.stdout else b"").decode().strip()
            sent = int(out.splitlines()[-1]) if out else 0
            events = sent
            deadline = time.monotonic() + 120
            while proc.stats.events < sent and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # one more commit interval
            stop.set()
        thread.join(600)
    finally:
        stop.set()
        if producer is not None and producer.poll() is None:
            producer.kill()
        src.close()
        dlq.close()
    end = src.last_commit_covering(events) or time.time()
    begin = src.first_record_at or t_start
    scorer = next(iter(proc.scorers.values()))
    alerts = proc.stats.alerts
    db.dispose()
    extra: dict[str, Any] = {
        "database": db_url.split("://")[0],
        "batch_records": batch,
        "precision": scorer.checkpoint.precision if scorer.checkpoint else None,
        "commit_interval_ms": commit_interval_ms,
        "snapshot_interval_s": snapshot_interval_s,
        "fetch_max_wait_ms": fetch_max_wait_ms,
        "group_join_s": round(begin - t_start, 2),
        "score_sample_rate": opts.score_sample_rate,
    }
    if proc.shadow is not None:
        extra["shadow_scored"] = proc.shadow.scored
    if rss_samples:
        t0 = rss_samples[0][0]
        extra["rss_samples"] = [(round(t - t0, 1), round(r / 2**20, 1), n) for t, r, n in rss_samples]
    return E2EResult(
        events=events,
        seconds=end - begin,
        events_per_s=events / max(end - begin, 1e-9),
        latency_ms=src.latency_pcts(),
        alerts=alerts,
        checkpoints=proc.stats.checkpoints,
        live_entities=len(scorer.store),
        rss_mb=rss_bytes() / 2**20,
        mode="drain" if rate is None else ("soak" if duration_s else "paced"),
        rate=rate,
        extra=extra,
    )


def bench_precisions(
    settings: Settings,
    bootstrap: str,
    db_url: str,
    precisions: list[str],
    *,
    events: int,
    entities: int,
    batch: int,
    repeats: int = 2,
    progress: Callable[[str], None] | None = None,
    **e2e: Any,
) -> list[dict[str, Any]]:
    """One row per requested precision: scorer windows/s (StreamScorer.process) and e2e drain events/s.
    Precisions are interleaved `repeats` times and the best of each is kept: on a shared machine the
    background load moves every run, and interleaving spreads it over all precisions alike."""
    load = SensorLoad(entities, seed=1)
    runs: dict[str, list[tuple[dict[str, Any], E2EResult]]] = {p: [] for p in precisions}
    for rnd in range(repeats):
        for p in precisions:
            s = settings.model_copy(update={"precision": p})
            sc = bench_scorer(s, load, batch=batch)
            dr = run_e2e(s, bootstrap, db_url, events=events, entities=entities, rate=None, batch=batch, **e2e)
            runs[p].append((sc, dr))
            if progress:
                progress(
                    f"precision {p} (runs as {sc['precision']}), round {rnd + 1}: scorer "
                    f"{sc['windows_per_s']:,.0f} windows/s (model only {sc['model_only_windows_per_s']:,.0f}), "
                    f"e2e {dr.events_per_s:,.0f} events/s"
                )
    # the model alone, the precisions alternating call by call on the same windows, best of many: the figure
    # least moved by background load (the rows above are each a few seconds long, at different moments)
    scorers = {p: sensor_scorer(settings.model_copy(update={"precision": p})) for p in precisions}
    windows = next(iter(scorers.values())).prepare(columns(load, 0, batch)).windows
    best = {p: float("inf") for p in precisions}
    for _ in range(20 * repeats):
        for p, scorer in scorers.items():
            t0 = time.perf_counter()
            scorer.checkpoint.score(windows, scorer.device)  # type: ignore[union-attr]
            best[p] = min(best[p], time.perf_counter() - t0)
    rows: list[dict[str, Any]] = []
    for p, got in runs.items():
        rows.append(
            {
                "precision": p,
                "runs_as": got[0][0]["precision"],
                "windows_per_s": max(g[0]["windows_per_s"] for g in got),
                "model_only_windows_per_s": max(g[0]["model_only_windows_per_s"] or 0.0 for g in got),
                "e2e_events_per_s": max(g[1].events_per_s for g in got),
                "model_best_windows_per_s": batch / best[p],
                "e2e_alerts": [g[1].alerts for g in got],
                "all_windows_per_s": [round(g[0]["windows_per_s"], 1) for g in got],
                "all_e2e_events_per_s": [round(g[1].events_per_s, 1) for g in got],
            }
        )
    base = next((r for r in rows if r["precision"] == "fp32"), rows[0])
    for r in rows:
        r["windows_vs_fp32"] = round(r["windows_per_s"] / base["windows_per_s"], 2)
        r["model_only_vs_fp32"] = round(r["model_only_windows_per_s"] / max(base["model_only_windows_per_s"], 1e-9), 2)
        r["e2e_vs_fp32"] = round(r["e2e_events_per_s"] / base["e2e_events_per_s"], 2)
        r["model_best_vs_fp32"] = round(r["model_best_windows_per_s"] / base["model_best_windows_per_s"], 2)
    return rows


def soak_summary(samples: list[tuple[float, float, int]]) -> dict[str, Any]:
    """RSS trend over the second half of the run (the first half is warm-up: allocator high-water marks,
    SQLite caches, every entity's first snapshot): MB at start/end, MB per million events and per minute."""
    if len(samples) < 4:
        return {"samples": len(samples)}
    s = samples[len(samples) // 2 :]
    t = np.array([x[0] for x in s])
    mb = np.array([x[1] for x in s])
    n = np.array([x[2] for x in s], float)
    slope_ev = float(np.polyfit(n, mb, 1)[0] * 1e6) if n[-1] > n[0] else None
    slope_min = float(np.polyfit(t, mb, 1)[0] * 60)
    return {
        "samples": len(samples),
        "rss_mb_start": float(samples[0][1]),
        "rss_mb_half": float(mb[0]),
        "rss_mb_end": float(mb[-1]),
        "rss_mb_max": float(mb.max()),
        "mb_per_million_events": slope_ev,
        "mb_per_minute": slope_min,
        "events": int(n[-1]),
    }
