"""What every benchmark shares: train through the serving path, then stream events through StreamScorer.

Nothing here scores in bulk: events go through `StreamScorer.process` in time-ordered micro-batches with
the same per-entity state, scaling and adaptive thresholds as the Kafka processor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from models.lstm_ae import Checkpoint, LSTMAEConfig, TrainConfig
from pipeline.features.streams import EventColumns, StreamSpec
from pipeline.scoring.scorer import StreamScorer
from pipeline.scoring.threshold import AdaptiveThreshold
from pipeline.training import train_stream_model


@dataclass
class Scored:
    """Per-event results in the order of the input columns."""

    scores: np.ndarray
    thresholds: np.ndarray
    alerts: np.ndarray  # bool


def take(cols: EventColumns, idx: np.ndarray) -> EventColumns:
    ids = cols.entity_ids
    return EventColumns([ids[i] for i in idx], cols.ts[idx], cols.base[idx])


def concat(parts: list[EventColumns]) -> EventColumns:
    ids: list[str] = []
    for p in parts:
        ids.extend(p.entity_ids)
    return EventColumns(ids, np.concatenate([p.ts for p in parts]), np.concatenate([p.base for p in parts]))


def fit(spec: StreamSpec, cols: EventColumns, model: LSTMAEConfig, train: TrainConfig, *, min_history: int,
        device: str = "cpu", name: str) -> Checkpoint:
    """Train on `cols` (normal/training events) through the serving path, with a progress bar per epoch."""
    bar = tqdm(total=train.epochs, desc=f"train {name}", file=sys.stderr, leave=False)

    def progress(epoch: int, tl: float, vl: float) -> None:
        bar.set_postfix(train=f"{tl:.4f}", val=f"{vl:.4f}")
        bar.update(1)

    try:
        return train_stream_model(spec, cols, model=model, train=train, min_history=min_history, name=name,
                                  device=device, progress=progress)
    finally:
        bar.close()


def make_scorer(spec: StreamSpec, ckpt: Checkpoint, threshold: AdaptiveThreshold, *, min_history: int,
                device: str = "cpu") -> StreamScorer:
    return StreamScorer(spec, ckpt, threshold=threshold, min_history=min_history, device=device)


def stream(scorer: StreamScorer, cols: EventColumns, *, learn: bool = True, batch_size: int = 2000,
           desc: str = "score") -> Scored:
    """Feed events in event-time order (stable, so each entity keeps its order) in micro-batches."""
    n = len(cols.entity_ids)
    order = np.argsort(cols.ts, kind="stable")
    scores = np.empty(n, np.float64)
    thresholds = np.empty(n, np.float64)
    alerts = np.zeros(n, bool)
    with tqdm(total=n, desc=desc, unit="ev", file=sys.stderr, leave=False, mininterval=0.5) as bar:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            res = scorer.process(take(cols, idx), learn=learn)
            scores[idx], thresholds[idx], alerts[idx] = res.scores, res.thresholds, res.is_anomaly
            bar.update(len(idx))
    return Scored(scores, thresholds, alerts)
