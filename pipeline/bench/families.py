"""Scorer events/s of both model families on the same events (StreamScorer.process: prepare + model +
thresholds; no Kafka, no DB): the LSTM autoencoder (the service's sensors model, W-step windows) and
the stateful forecasting LSTM (one step per event, (h, c) gathered from and scattered back to the
entity state), trained here on the same simulated normal sensor traffic as the default models.

    python -m pipeline.bench.families --entities 10000 --batch 1000 --seconds 8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from models.lstm_forecast import ForecastCheckpoint, ForecastConfig, ForecastTrainConfig
from pipeline.bench.load import SensorLoad
from pipeline.config import Settings
from pipeline.features.streams import EventColumns, SensorStream
from pipeline.scoring.factory import build_scorer
from pipeline.scoring.scorer import StreamScorer


def forecaster(channels: list[str], hidden: int = 64, seed: int = 0) -> ForecastCheckpoint:
    """A forecaster trained on pipeline.simulate's normal sensor traffic (what the default models see)."""
    from pipeline.simulate import simulate_sensors, strip_labels
    from pipeline.training import train_stream_forecaster

    spec = SensorStream(channels)
    recs, _ = simulate_sensors(24, 400, seed=seed + 12)
    cols = spec.columns([spec.parse(r) for r in strip_labels(recs)])
    return train_stream_forecaster(
        spec,
        cols,
        model=ForecastConfig(n_features=spec.n_features, hidden_size=hidden),
        train=ForecastTrainConfig(epochs=3, seed=seed),
        min_history=8,
    )


def _columns(load: SensorLoad, start: int, n: int) -> EventColumns:
    dev, ts, vals = load.arrays(start, n)
    return EventColumns([load.ids[d] for d in dev.tolist()], ts, vals)


def events_per_s(scorer: StreamScorer, load: SensorLoad, batch: int, seconds: float) -> float:
    """Warm every entity once, then time process() on pre-built batches (best of the timed passes)."""
    k = load.k
    scorer.process(_columns(load, 0, k))
    batches = [_columns(load, k + i * batch, batch) for i in range(max(1, int(2 * k / batch)))]
    n, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or i < len(batches):
        n += len(scorer.process(batches[i % len(batches)]).scores)
        i += 1
    return n / (time.perf_counter() - t0)


def bench_families(
    settings: Settings, *, entities: int = 10_000, batch: int = 1000, seconds: float = 8.0, hidden: int = 64
) -> dict[str, Any]:
    from pipeline.bench.core import sensor_scorer

    ae = sensor_scorer(settings, "cpu")
    spec = ae.spec
    fc = forecaster(list(spec.feature_names), hidden)
    stateful = build_scorer(spec, fc)
    load_avg = [round(x, 2) for x in os.getloadavg()]
    ae_rate = events_per_s(ae, SensorLoad(entities, seed=1), batch, seconds)
    fc_rate = events_per_s(stateful, SensorLoad(entities, seed=1), batch, seconds)
    return {
        "entities": entities,
        "batch": batch,
        "load_avg_at_start": load_avg,
        "lstm_ae": {
            "events_per_s": round(ae_rate, 1),
            "window": ae.store.layout.window,
            "state_blob_bytes": ae.store.layout.blob_size,
            "model": ae.model_version,
        },
        "lstm_forecast": {
            "events_per_s": round(fc_rate, 1),
            "hidden_size": hidden,
            "state_blob_bytes": stateful.store.layout.blob_size,
            "model": stateful.model_version,
        },
        "forecast_vs_ae": round(fc_rate / ae_rate, 2),
    }


def e2e_families(
    settings: Settings,
    *,
    entities: int = 10_000,
    rate: float = 20_000.0,
    seconds: float = 20.0,
    drain_events: int = 100_000,
    batch: int = 1000,
    hidden: int = 64,
    shadow: bool = False,
) -> dict[str, Any]:
    """The whole service path (embedded broker, processor, SQLite) with each family as the sensors model:
    drain events/s and the latency percentiles of a run paced at `rate` (the same knobs as `pipeline bench`).
    shadow: both runs again with a challenger of the same family scoring every event (issue 14's targets:
    >= 50 % of the single-model events/s, p99 <= 250 ms at `rate`)."""
    import shutil
    import tempfile
    from pathlib import Path

    from models.lstm_ae import bundled_checkpoint_path
    from models.lstm_forecast import save_forecaster
    from pipeline.bench.core import run_e2e
    from pipeline.kafka.broker import resolve_bootstrap

    boot, broker = resolve_bootstrap(None)
    out: dict[str, Any] = {"rate": rate, "seconds": seconds, "entities": entities}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
            for family in ("lstm_ae", "lstm_forecast"):
                models = Path(tmp) / family
                models.mkdir()
                shutil.copy(bundled_checkpoint_path("transactions"), models / "transactions.pt")
                if family == "lstm_ae":
                    shutil.copy(bundled_checkpoint_path("sensors"), models / "sensors.pt")
                else:
                    save_forecaster(forecaster(list(settings.sensor_channels), hidden), models / "sensors.pt")
                s = settings.model_copy(update={"models_dir": models, "device": "cpu"})
                db = f"sqlite:///{tmp}/{family}.db"
                kw = dict(
                    entities=entities,
                    batch=batch,
                    commit_interval_ms=100,
                    snapshot_interval_s=10.0,
                    fetch_max_wait_ms=20,
                )
                runs: dict[str, Any] = {}
                for with_challenger in (False, True) if shadow else (False,):
                    kw["shadow"] = with_challenger
                    drain = run_e2e(s, boot, db, events=drain_events, rate=None, **kw)  # type: ignore[arg-type]
                    paced = run_e2e(s, boot, db, events=int(rate * seconds), rate=rate, **kw)  # type: ignore[arg-type]
                    runs["with_challenger" if with_challenger else "single"] = {
                        "drain_events_per_s": round(drain.events_per_s, 1),
                        "paced_latency_ms": paced.latency_ms,
                        "paced_events_per_s": round(paced.events_per_s, 1),
                        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
                    }
                if shadow:
                    runs["challenger_vs_single"] = round(
                        runs["with_challenger"]["drain_events_per_s"] / runs["single"]["drain_events_per_s"], 3
                    )
                out[family] = runs
    finally:
        if broker is not None:
            broker.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipeline.cli import _settings

    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.families", description=__doc__.splitlines()[0])
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument(
        "--e2e-rate",
        type=float,
        default=0.0,
        help="also run the service path with each family (drain, then paced at this events/s)",
    )
    ap.add_argument("--shadow", action="store_true", help="--e2e-rate runs again with a challenger of the same family")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    s = _settings()
    s.device = "cpu"
    if args.e2e_rate > 0:
        print(
            json.dumps(
                e2e_families(
                    s,
                    entities=args.entities,
                    rate=args.e2e_rate,
                    batch=args.batch,
                    hidden=args.hidden,
                    shadow=args.shadow,
                )
            )
        )
        return 0
    print(
        json.dumps(
            bench_families(s, entities=args.entities, batch=args.batch, seconds=args.seconds, hidden=args.hidden)
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
