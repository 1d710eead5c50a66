"""The knobs of the per-entity adaptive threshold, declared once: Settings (PIPELINE_THRESHOLD_*), the
evaluation formats' configs and the scorer factory all take this dataclass.

Its own module, free of numpy and torch, because `pipeline.config` imports it and `pipeline --help` must
stay light.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ThresholdKnobs:
    """warmup: normal scores an entity needs before its own statistics replace the model's global threshold.
    z: a warm entity's threshold is exp(mean + z*std) - 1 of its normal log1p-scores.
    floor_ratio: an entity's threshold never goes below floor_ratio * the global threshold.
    smoothing: EWMA alpha of each entity's log-scores before the comparison, in (0, 1]; 1 = none.
    min_history: events an entity needs before any alert (its window has filled)."""

    warmup: int = 30
    z: float = 4.0
    floor_ratio: float = 1.0
    smoothing: float = 1.0
    min_history: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1]; got {self.smoothing}")
