"""Per-entity adaptive threshold on reconstruction scores.

While an entity is young (fewer than `warmup` normal scores) it is judged against the model's global
threshold, calibrated on held-out normal data. Once warm, its own threshold is exp(mu + z*sigma) - 1 of
its normal log1p-scores (Welford statistics that anomalous scores never update), floored at
`floor_ratio` x the global threshold so a very regular entity cannot become hair-trigger.

With `smoothing` < 1 the decision is made on an EWMA of the entity's log-scores (alpha = smoothing), and
the statistics are those of the smoothed scores: persistent faults (a closed valve, a drifting bearing)
accumulate evidence over several events while a single noisy reading fades. 1 = no smoothing. A young
entity is judged by its raw score, as the model's (global, young) thresholds were calibrated on raw scores.

With `z_release` (< z) the threshold has hysteresis, as a Schmitt trigger: a warm entity enters an alert when
its score passes the z threshold and stays in it while the score stays above the lower z_release one, so a
fault whose score hovers around the threshold is reported as one run rather than a flicker. Whether the
entity's last judged event alerted is part of its state (`ScoreStats.alerting`, snapshotted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.state.store import ScoreStats


class Verdict(NamedTuple):
    """One round of events (distinct entities): the score each was judged by, its threshold, the decision."""

    scores: np.ndarray
    thresholds: np.ndarray
    is_anomaly: np.ndarray


class Threshold(Protocol):
    """What the scorer asks of a threshold, one round of distinct entities at a time."""

    def classify(
        self, stats: ScoreStats, slots: np.ndarray, scores: np.ndarray, eligible: np.ndarray, held: np.ndarray | None
    ) -> Verdict:
        """Judge the model's scores; only `eligible` events can be anomalous; `held` events (late or out of
        order) are judged without moving the entity's smoothed score."""
        ...

    def observe(self, stats: ScoreStats, slots: np.ndarray, scores: np.ndarray, normal: np.ndarray) -> None:
        """Learn from the judged scores of the `normal` events (anomalies are kept out)."""
        ...


@dataclass(frozen=True)
class AdaptiveThreshold:
    """young_threshold: what a young entity is judged by, where the model calibrated one for early life
    (a forecaster's card); None = the global threshold. The floor stays floor_ratio x the global threshold."""

    global_threshold: float
    knobs: ThresholdKnobs = ThresholdKnobs()
    young_threshold: float | None = None

    def classify(
        self, stats: ScoreStats, slots: np.ndarray, scores: np.ndarray, eligible: np.ndarray, held: np.ndarray | None
    ) -> Verdict:
        k = self.knobs
        # hysteresis: an entity in an alert is judged at its release z (a young one: its young threshold either way)
        alerting = None
        if k.z_release is None:
            thresholds = self.thresholds(stats, slots)
        else:
            alerting = stats.alerting[slots]
            thresholds = self.thresholds(stats, slots, np.where(alerting, k.z_release, k.z))
        judged = self.smooth(stats, slots, scores, held)
        if k.smoothing < 1.0:  # a young entity's raw score meets the model's threshold, calibrated on raw scores
            judged = np.where(stats.n[slots] >= k.warmup, judged, scores)
        anomalous = eligible & (judged > thresholds)
        if alerting is not None:
            kept = slots if held is None else slots[~held]  # late events leave the entity's alert state alone
            stats.alerting[kept] = anomalous if held is None else anomalous[~held]
        return Verdict(judged, thresholds, anomalous)

    def thresholds(self, stats: ScoreStats, slots: np.ndarray, z: float | np.ndarray | None = None) -> np.ndarray:
        """While an entity is young, the model's threshold for young entities (the global one unless the model
        calibrated one); then its own at z (default: the knobs'; or one z per entity), floored."""
        k = self.knobs
        n = stats.n[slots]
        std = np.sqrt(stats.m2[slots] / np.maximum(n - 1, 1))
        own = np.expm1(stats.mean[slots] + (k.z if z is None else z) * std)
        own = np.maximum(own, k.floor_ratio * self.global_threshold)
        young = self.global_threshold if self.young_threshold is None else self.young_threshold
        return np.where(n >= k.warmup, own, young)

    def smooth(
        self, stats: ScoreStats, slots: np.ndarray, scores: np.ndarray, held: np.ndarray | None = None
    ) -> np.ndarray:
        """EWMA of each entity's log1p-scores: a persistent fault accumulates, a one-off blip fades, and one
        absurd score cannot hold the average up for long (log scale, like the statistics). Returns the smoothed
        scores in score units; `held` events do not advance their entity's average. smoothing = 1 returns the
        raw scores and keeps no average: nothing reads it, and the hot path need not pay for it."""
        alpha = self.knobs.smoothing
        if alpha >= 1.0:
            return scores
        x = np.log1p(np.maximum(scores, 0.0))
        prev = stats.ema[slots]
        smoothed = np.where(np.isnan(prev), x, alpha * x + (1.0 - alpha) * prev)
        if held is None:
            stats.ema[slots] = smoothed
        else:
            stats.ema[slots[~held]] = smoothed[~held]
        return np.asarray(np.expm1(smoothed))

    def observe(self, stats: ScoreStats, slots: np.ndarray, scores: np.ndarray, normal: np.ndarray) -> None:
        """Welford update of the entities' normal log1p-scores; with smoothing, of the smoothed ones (the EWMA of
        the event just judged, also where a young entity was judged by its raw score)."""
        if not normal.any():
            return
        s = slots[normal]
        x = stats.ema[s] if self.knobs.smoothing < 1.0 else np.log1p(np.maximum(scores[normal], 0.0))
        n = stats.n[s] + 1
        m = stats.mean[s]
        delta = x - m
        m_new = m + delta / n
        stats.m2[s] += delta * (x - m_new)
        stats.mean[s] = m_new
        stats.n[s] = n


def telemanom_epsilon(
    e: np.ndarray,
    z_min: float = 2.5,
    z_max: float = 12.0,
    z_step: float = 0.5,
    buffer: int = 20,
    max_sequences: int = 5,
    max_fraction: float = 0.5,
) -> tuple[float, float]:
    """telemanom's nonparametric threshold over smoothed errors `e` (Hundman et al. 2018, eq. 2-3).

    Candidates eps = mean + z * std; the chosen one maximises (drop in mean + drop in std of the errors
    below eps, both relative) / (sequences^2 + anomalous points), where points above eps are widened by
    `buffer` steps each side and grouped into sequences; candidates flagging more than `max_sequences`
    sequences or `max_fraction` of the points are refused (telemanom's limits). -> (eps, largest error
    below eps), the latter being what pruning compares anomalous sequences against."""
    e = np.asarray(e, np.float64)
    n = len(e)
    mean, sd = float(e.mean()), float(e.std())
    if n == 0 or sd <= 0.0:
        return mean, mean
    zs = np.arange(z_min, z_max, z_step)
    eps = mean + zs * sd  # (Z,)
    above = e[None, :] >= eps[:, None]  # (Z, N)
    if buffer > 0:  # widen each anomalous point by `buffer` steps each side (a running max over 2b+1 steps)
        cs = np.concatenate(
            [
                np.zeros((len(zs), buffer + 1)),
                np.cumsum(above, axis=1),
                np.repeat(np.cumsum(above, axis=1)[:, -1:], buffer, axis=1),
            ],
            axis=1,
        )
        idx = np.arange(n)
        above = (cs[:, idx + 2 * buffer + 1] - cs[:, idx]) > 0
    n_anom = above.sum(axis=1)
    n_seq = above[:, 0].astype(np.int64) + (above[:, 1:] & ~above[:, :-1]).sum(axis=1)
    srt = np.sort(e)
    k = np.searchsorted(srt, eps, side="left")  # points below each candidate
    s1 = np.r_[0.0, np.cumsum(srt)]
    s2 = np.r_[0.0, np.cumsum(srt * srt)]
    kk = np.maximum(k, 1)
    m_below = s1[k] / kk
    sd_below = np.sqrt(np.maximum(s2[k] / kk - m_below**2, 0.0))
    objective = ((mean - m_below) / max(abs(mean), 1e-12) + (sd - sd_below) / sd) / np.maximum(n_seq**2 + n_anom, 1)
    valid = (n_anom > 0) & (n_seq <= max_sequences) & (n_anom < max_fraction * n) & (k > 0)
    if not valid.any():
        best = mean + z_max * sd
    else:
        cand = np.where(valid, objective, -np.inf)
        best = float(eps[np.flatnonzero(cand == cand.max())[-1]])  # ties: the larger z, as telemanom's >=
    below = srt[: np.searchsorted(srt, best, side="left")]
    return best, float(below[-1]) if len(below) else mean


@dataclass
class DynamicThreshold:
    """telemanom's nonparametric dynamic threshold, streaming: per entity, an EWMA of the error (the square
    root of the score, an error magnitude like telemanom's) and a trailing ring of the last `window`
    smoothed errors, from which `telemanom_epsilon` picks the threshold every `every` events. Pruning of
    weak anomalous sequences, streaming form: an event alerts only if its smoothed error also exceeds the
    largest normal (below-eps) error of the window by the factor 1 / (1 - prune), the link of telemanom's
    pruning chain that decides the weakest sequences. Until an entity has `min_errors` errors the model's
    global threshold applies.

    Unsupervised by design (as telemanom), the ring follows every event, anomalous or not, and is not part
    of the snapshotted entity state: an evaluation-time method (`pipeline evaluate`), not yet served."""

    global_threshold: float
    window: int = 2000
    min_errors: int = 100
    alpha: float = 2.0 / 31.0  # telemanom smooths with an EWMA of span 30
    buffer: int = 20
    prune: float = 0.13
    every: int = 10
    z_min: float = 2.5
    z_max: float = 12.0
    _rings: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _n: dict[int, int] = field(default_factory=dict, repr=False)
    _ema: dict[int, float] = field(default_factory=dict, repr=False)
    _thr: dict[int, tuple[float, int]] = field(default_factory=dict, repr=False)  # (threshold, n at fit)

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0 or not 0.0 <= self.prune < 1.0 or self.window < 10:
            raise ValueError(f"DynamicThreshold: alpha in (0, 1], prune in [0, 1), window >= 10; got {self}")

    def classify(
        self, stats: ScoreStats, slots: np.ndarray, scores: np.ndarray, eligible: np.ndarray, held: np.ndarray | None
    ) -> Verdict:
        """The ring follows every event, held ones too (see the class docstring)."""
        thresholds = self.thresholds(slots)
        judged = self.smooth(slots, scores)
        return Verdict(judged, thresholds, eligible & (judged > thresholds))

    def smooth(self, slots: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = np.empty(len(slots), np.float64)
        for i, (s, sc) in enumerate(zip(slots.tolist(), np.sqrt(np.maximum(scores, 0.0)).tolist(), strict=True)):
            prev = self._ema.get(s)
            ema = sc if prev is None else self.alpha * sc + (1.0 - self.alpha) * prev
            self._ema[s] = ema
            ring = self._rings.get(s)
            if ring is None:
                ring = self._rings[s] = np.empty(self.window)
            n = self._n.get(s, 0)
            ring[n % self.window] = ema
            self._n[s] = n + 1
            out[i] = ema * ema
        return out

    def thresholds(self, slots: np.ndarray) -> np.ndarray:
        out = np.full(len(slots), self.global_threshold, np.float64)
        for i, s in enumerate(slots.tolist()):
            n = self._n.get(s, 0)
            if n < self.min_errors:
                continue
            fitted = self._thr.get(s)
            if fitted is None or n - fitted[1] >= self.every:
                e = self._rings[s][: min(n, self.window)]
                eps, normal_max = telemanom_epsilon(e, self.z_min, self.z_max, buffer=self.buffer)
                fitted = (max(eps, normal_max / (1.0 - self.prune)), n)
                self._thr[s] = fitted
            out[i] = fitted[0] ** 2
        return out

    def observe(self, stats: ScoreStats, slots: np.ndarray, scores: np.ndarray, normal: np.ndarray) -> None:
        """The ring already follows every event (see the class docstring)."""
