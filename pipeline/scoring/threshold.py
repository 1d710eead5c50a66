"""Per-entity adaptive threshold on reconstruction scores.

While an entity is young (fewer than `warmup` normal scores) it is judged against the model's global
threshold, calibrated on held-out normal data. Once warm, its own threshold is exp(mu + z*sigma) - 1 of
its normal log1p-scores (Welford statistics that anomalous scores never update), floored at
`floor_ratio` x the global threshold so a very regular entity cannot become hair-trigger.
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

    def thresholds(self, store: EntityStateStore, slots: np.ndarray) -> np.ndarray:
        return store.score_threshold(slots, self.global_threshold, self.warmup, self.z, self.floor_ratio)

    def observe(self, store: EntityStateStore, slots: np.ndarray, scores: np.ndarray, normal: np.ndarray) -> None:
        """Feed normal scores into the entities' statistics (anomalies are kept out)."""
        if normal.any():
            store.update_score_stats(slots[normal], scores[normal])
