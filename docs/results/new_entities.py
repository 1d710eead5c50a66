"""False alerts on new entities of a served stateful forecaster (docs/results/evaluation.md, 2026-12-01 round).

Trains a forecaster on 24 simulated pumps x 400 normal readings (pipeline.simulate, seed 12) with the
parameters `pipeline train --stream` uses by default (SKAB's: tbptt 256, segment 1024, 30 epochs), serves it
through the service's scorer factory on 220 *new* pumps (seed 99; 10 with spikes, 10 with drifts in their last
`--anomaly-len` readings) and counts false alerts (normal pumps, and faulty pumps before their fault), by
reading index, and faulty pumps alerted inside their fault. `--no-young` drops the card's young_threshold
(the behaviour before it existed).

    OMP_NUM_THREADS=1 python docs/results/new_entities.py [--readings 100] [--anomaly-len 20] [--no-young]
        [--served-knobs]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import numpy as np
import torch

from models.lstm_forecast import ForecastTrainConfig
from pipeline.evaluate.skab import SkabConfig
from pipeline.features.streams import EventColumns, SensorStream
from pipeline.scoring.factory import build_scorer
from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.simulate import SENSOR_CHANNELS, simulate_sensors, strip_labels
from pipeline.training import train_stream_forecaster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=100, help="readings per new pump")
    ap.add_argument("--anomaly-len", type=int, default=20, help="faulty pumps: the fault spans the last N readings")
    ap.add_argument("--no-young", action="store_true", help="serve without the card's young_threshold")
    ap.add_argument(
        "--served-knobs", action="store_true", help="the knobs `pipeline train` writes into the card (SkabConfig's)"
    )
    ap.add_argument("--tbptt", type=int, default=256)
    ap.add_argument("--segment", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = SensorStream(SENSOR_CHANNELS)

    def cols(recs: list[dict]) -> EventColumns:
        return spec.columns([spec.parse(r) for r in strip_labels(recs)])

    train, _ = simulate_sensors(24, 400, seed=12)
    cfg = ForecastTrainConfig(epochs=SkabConfig().epochs, tbptt=args.tbptt, segment=args.segment)
    ckpt = train_stream_forecaster(spec, cols(train), train=cfg)
    young = ckpt.card.pop("young_threshold") if args.no_young else ckpt.card["young_threshold"]
    new, injected = simulate_sensors(
        220, args.readings, seed=99, spike_devices=10, drift_devices=10, anomaly_len=args.anomaly_len
    )
    c = cols(new)
    if args.served_knobs:
        ckpt.card["threshold_knobs"] = asdict(SkabConfig().threshold)
    res = build_scorer(spec, ckpt, knobs=ThresholdKnobs()).process(c)
    ids = np.asarray(c.entity_ids, dtype=object)
    seen: dict[str, int] = {}
    index = np.empty(len(ids), int)
    for i, e in enumerate(ids.tolist()):
        index[i] = seen.get(e, 0)
        seen[e] = index[i] + 1
    first = np.array([injected.entities.get(e, 10**9) for e in ids.tolist()])
    normal = np.array([e not in injected.entities for e in ids.tolist()])
    false = res.is_anomaly & (index < first)
    print(
        json.dumps(
            {
                "threshold": round(ckpt.threshold, 2),
                "young_threshold": None if args.no_young else round(young, 2),
                "false_alerts_normal_pumps": int((false & normal).sum()),
                "normal_pumps_with_false_alerts": len(set(ids[false & normal].tolist())),
                "false_alerts_before_fault": int((false & ~normal).sum()),
                "false_by_reading": dict(
                    zip(
                        ["0-15", "16-23", "24-31", "32-39", "40-49", "50+"],
                        np.histogram(index[false], bins=[0, 16, 24, 32, 40, 50, 10**9])[0].tolist(),
                        strict=True,
                    )
                ),
                "faults_caught": len(set(ids[res.is_anomaly & (index >= first)].tolist())),
                "faulty_pumps": len(injected.entities),
            }
        )
    )


if __name__ == "__main__":
    main()
