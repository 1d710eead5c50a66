"""Per-entity adaptive threshold on reconstruction scores.

While an entity is young (fewer than `warmup` normal scores) it is judged against the model's global
threshold, calibrated on held-out normal data. Once warm, its own threshold is exp(mu + z*sigma) - 1 of
its normal log1p-scores (Welford statistics that anomalous scores never update), floored at
`floor_ratio` x the global threshold so a very regular entity cannot become hair-trigger.

With `smoothing` < 1 the decision is made on an EWMA of the entity's log-scores (alpha = smoothing), and
the statistics are those of the smoothed scores: persistent faults (a closed valve, a drifting bearing)
accumulate evidence over several events while a single noisy reading fades. 1 = no smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.state.store import EntityStateStore


@dataclass(frozen=True)
class AdaptiveThreshold:
    global_threshold: float
    warmup: int = 30
    z: float = 4.0
    floor_ratio: float = 1.0
    smoothing: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1]; got {self.smoothing}")

    def smooth(self, store: EntityStateStore, slots: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Advance the entities' smoothed scores by one event each (slots distinct); returns them."""
        return store.smooth_scores(slots, scores, self.smoothing)

    def thresholds(self, store: EntityStateStore, slots: np.ndarray) -> np.ndarray:
        return store.score_threshold(slots, self.global_threshold, self.warmup, self.z, self.floor_ratio)

    def observe(self, store: EntityStateStore, slots: np.ndarray, scores: np.ndarray, normal: np.ndarray) -> None:
        """Feed normal scores into the entities' statistics (anomalies are kept out)."""
        if normal.any():
            store.update_score_stats(slots[normal], scores[normal])
