"""The knobs of the per-entity adaptive threshold, declared once: Settings (PIPELINE_THRESHOLD_*), the
evaluation formats' configs and the scorer factory all take this dataclass.

Its own module, free of numpy and torch, because `pipeline.config` imports it and `pipeline --help` must
stay light.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ThresholdKnobs:
    """warmup: normal scores an entity needs before its own statistics replace the model's global threshold.
    z: a warm entity's threshold is exp(mean + z*std) - 1 of its normal log1p-scores.
    floor_ratio: an entity's threshold never goes below floor_ratio * the global threshold.
    smoothing: EWMA alpha of each entity's log-scores before the comparison, in (0, 1]; 1 = none.
    min_history: events an entity needs before any alert (its window has filled).
    z_release: hysteresis for a warm entity: once an event alerts, the entity's next events alert while their
    score stays above exp(mean + z_release*std) - 1 (z_release <= z), so a fault whose score hovers around the
    threshold is one alert run, not a flicker of many; None = no hysteresis (every event judged at z)."""

    warmup: int = 30
    z: float = 4.0
    floor_ratio: float = 1.0
    smoothing: float = 1.0
    min_history: int = 8
    z_release: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.z) and self.z >= 0.0):
            raise ValueError(f"z must be a finite number of standard deviations >= 0; got {self.z}")
        if self.warmup < 0 or self.min_history < 1:
            raise ValueError(f"warmup must be >= 0 and min_history >= 1; got {self.warmup}, {self.min_history}")
        if not (math.isfinite(self.floor_ratio) and self.floor_ratio >= 0.0):
            raise ValueError(f"floor_ratio must be >= 0; got {self.floor_ratio}")
        if self.z_release is not None and not (math.isfinite(self.z_release) and self.z_release >= 0.0):
            raise ValueError(f"z_release must be a finite number >= 0; got {self.z_release}")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1]; got {self.smoothing}")
        if self.z_release is not None and self.z_release > self.z:
            raise ValueError(f"z_release must be <= z ({self.z}); got {self.z_release}")

    @classmethod
    def served(cls, configured: ThresholdKnobs, card_knobs: Mapping[str, Any] | None) -> ThresholdKnobs:
        """The knobs a model is served with: those its card names (chosen with its family on validation), except
        where the configuration (PIPELINE_THRESHOLD_*) sets a knob away from its default: the operator's word
        wins. A card without knobs: the configuration's. Keys a newer card may add are ignored."""
        if not card_knobs:
            return configured
        default = cls()
        merged = {}
        for f in fields(cls):
            mine = getattr(configured, f.name)
            merged[f.name] = mine if mine != getattr(default, f.name) else card_knobs.get(f.name, mine)
        return cls(**merged)
