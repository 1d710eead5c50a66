"""Drift figures of a served model against its card: pure numpy, no IO, so the running service (gauges) and
`pipeline models drift` compute the same numbers.

Population stability index (PSI). The card holds quantiles of a reference distribution: the held-out normal
scores (`metrics.val_score_quantiles`) or each channel's training values (`channel_stats[name].quantiles`), as a mapping
{level: value}, e.g. {"0.5": 6.3, "0.9": 14.1, "0.99": 34.7}. The quantile values q_1 < ... < q_k cut the line
into k + 1 bins (-inf, q_1], (q_1, q_2], ..., (q_k, inf) whose expected shares are known from the levels l_i:
e_1 = l_1, e_i = l_i - l_(i-1), e_(k+1) = 1 - l_k. With a_i the share of live values in bin i,

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)        (a_i and e_i floored at EPSILON, so an empty bin counts)

The usual reading: PSI < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 a real shift (retrain or investigate).
The standardized mean shift of a channel is (live mean - training mean) / training std: how many training
standard deviations the live mean has moved.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

EPSILON = 1e-4  # floor of a bin share: an empty bin adds a large but finite term
STABLE_BELOW = 0.1
SHIFT_ABOVE = 0.25


def reading(psi_value: float) -> str:
    """The usual verbal reading of a PSI value."""
    if psi_value < STABLE_BELOW:
        return "stable"
    return "moderate" if psi_value <= SHIFT_ABOVE else "shift"


def quantile_table(quantiles: Mapping[str, float] | Mapping[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Levels and values of a card's {level: value} mapping, sorted by level, checked for sense."""
    if not quantiles:
        raise ValueError("no quantiles")
    pairs = sorted((float(level), float(value)) for level, value in quantiles.items())
    levels = np.array([p[0] for p in pairs])
    values = np.array([p[1] for p in pairs])
    if not ((levels > 0) & (levels < 1)).all():
        raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {levels.tolist()}")
    if not np.isfinite(values).all() or (np.diff(values) < 0).any():
        raise ValueError(f"quantile values must be finite and non-decreasing, got {values.tolist()}")
    return levels, values


def psi(live: Sequence[float] | np.ndarray, levels: np.ndarray, values: np.ndarray) -> float:
    """PSI of `live` values against the reference distribution given by its quantiles (see the module doc)."""
    x = np.asarray(live, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("no finite live values")
    # tied quantile values make one edge: P(X <= v) is the highest level at which v occurs
    edges, first = np.unique(values[::-1], return_index=True)
    cum = levels[::-1][first]
    expected = np.diff(np.concatenate(([0.0], cum, [1.0])))
    counts = np.bincount(np.searchsorted(edges, x, side="left"), minlength=edges.size + 1)
    actual = counts / x.size
    e = np.maximum(expected, EPSILON)
    a = np.maximum(actual, EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def score_psi(live_scores: Sequence[float] | np.ndarray, card: Mapping[str, Any]) -> float:
    """PSI of live scores against the card's held-out normal score quantiles."""
    levels, values = quantile_table(card_score_quantiles(card))
    return psi(live_scores, levels, values)


def card_score_quantiles(card: Mapping[str, Any]) -> dict[str, float]:
    """The card's held-out normal score quantiles (metrics.val_score_quantiles, as training writes them).
    Cards written before that carry only metrics.val_score_pNN (p50, p99): a coarser but valid reference."""
    metrics = card.get("metrics") or {}
    quantiles = metrics.get("val_score_quantiles")
    if quantiles:
        return {str(k): float(v) for k, v in quantiles.items()}
    legacy = {
        f"0.{key.removeprefix('val_score_p')}": float(v)
        for key, v in metrics.items()
        if re.fullmatch(r"val_score_p\d{2,}", key)  # p50 = 0.50, p99 = 0.99, p999 = 0.999
    }
    if not legacy:
        raise ValueError("the model card holds no score quantiles (metrics.val_score_quantiles): retrain it")
    return legacy


@dataclass(frozen=True)
class ChannelDrift:
    """Input drift of one channel against its training statistics."""

    channel: str
    n: int  # live values used
    psi: float | None  # None: the card has no quantiles for this channel
    mean_shift: float  # (live mean - training mean) / training std


def channel_drift(
    live: Mapping[str, Sequence[float] | np.ndarray], channel_stats: Mapping[str, Mapping[str, Any]]
) -> list[ChannelDrift]:
    """Per-channel drift of live inputs ({channel: values}) against the card's `channel_stats`
    ({channel: {"mean", "std", "quantiles": {level: value}}}). Channels without live values are left out."""
    out = []
    for name, stats in channel_stats.items():
        x = np.asarray(live.get(name, ()), dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size == 0:
            continue
        std = max(float(stats["std"]), 1e-12)
        shift = (float(x.mean()) - float(stats["mean"])) / std
        quantiles = stats.get("quantiles")
        value = psi(x, *quantile_table(quantiles)) if quantiles else None
        out.append(ChannelDrift(name, int(x.size), value, shift))
    return out


def warming_share(warming: int, total: int) -> float:
    """Share of known entities that are still warming up (no score yet); 0 when there are none."""
    if warming < 0 or total < 0 or warming > total:
        raise ValueError(f"need 0 <= warming <= total, got warming={warming} total={total}")
    return warming / total if total else 0.0
