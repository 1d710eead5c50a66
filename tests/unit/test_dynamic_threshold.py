"""telemanom's nonparametric dynamic threshold (pipeline.scoring.threshold) on synthetic errors."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.scoring.threshold import DynamicThreshold, telemanom_epsilon
from pipeline.state.store import EntityStateStore, StateLayout

STATS = EntityStateStore(StateLayout(1, 1), np.zeros(1), np.ones(1)).score_stats()  # the dynamic one keeps its own


def _flag(thr: DynamicThreshold, slot: np.ndarray, score: float) -> bool:
    return bool(thr.classify(STATS, slot, np.array([score]), np.ones(1, bool), None).is_anomaly[0])


def test_epsilon_separates_a_burst_from_noise() -> None:
    rng = np.random.default_rng(0)
    e = np.abs(rng.normal(0, 1, 2000))
    e[1500:1530] += 8.0
    eps, normal_max = telemanom_epsilon(e, buffer=5)
    assert np.abs(rng.normal(0, 1, 2000)).max() < eps < 8.0  # above the noise, below the burst
    assert normal_max < eps and (e >= eps).sum() >= 25


def test_epsilon_on_pure_noise_flags_only_the_extreme_tail() -> None:
    """As in telemanom, noise alone still yields a candidate; it flags a few extreme points, which the
    pruning step (DynamicThreshold) is there to drop."""
    e = np.abs(np.random.default_rng(1).normal(0, 1, 2000))
    eps, _ = telemanom_epsilon(e, z_max=12.0, buffer=5)
    assert (e >= eps).mean() < 0.005


def test_epsilon_refuses_too_many_sequences() -> None:
    e = np.zeros(1000) + 0.1
    e[::100] = 5.0  # ten separate spikes: telemanom's candidate limit (5 sequences) refuses every z
    eps, _ = telemanom_epsilon(e, buffer=2)
    assert eps == pytest.approx(e.mean() + 12.0 * e.std())


def test_constant_errors_do_not_divide_by_zero() -> None:
    eps, nm = telemanom_epsilon(np.full(100, 0.5))
    assert eps == 0.5 and nm == 0.5


def test_streaming_threshold_flags_a_burst_and_not_noise() -> None:
    rng = np.random.default_rng(2)
    scores = rng.chisquare(2, 3000)
    scores[2500:2560] += 200.0
    thr = DynamicThreshold(global_threshold=50.0, window=1000, min_errors=100, buffer=10)
    slot = np.array([0])
    flags = np.array([_flag(thr, slot, sc) for sc in scores])
    assert flags[2500:2560].mean() > 0.5
    assert flags[:2500].mean() < 0.01


def test_pruning_drops_weak_sequences() -> None:
    """A bump barely above the largest normal error is pruned; without pruning it alerts."""
    rng = np.random.default_rng(3)
    base = np.abs(rng.normal(0, 0.05, 1500)) + 1.0
    base[1400:1420] = base[:1400].max() * 1.05
    for prune, expect in ((0.13, False), (0.0, True)):
        thr = DynamicThreshold(global_threshold=100.0, window=1500, min_errors=100, buffer=2, prune=prune, alpha=1.0)
        slot = np.array([0])
        flags = [_flag(thr, slot, sc) for sc in base**2]  # squared errors; the threshold works on their roots
        assert any(flags[1400:1420]) is expect


def test_entities_are_independent_and_batched_equals_single() -> None:
    rng = np.random.default_rng(4)
    scores = rng.chisquare(2, (400, 3))
    a, b = DynamicThreshold(10.0, window=200, min_errors=50), DynamicThreshold(10.0, window=200, min_errors=50)
    slots = np.array([0, 1, 2])
    everyone = np.ones(3, bool)
    for row in scores:
        batched = a.classify(STATS, slots, row, everyone, None)
        single = [b.classify(STATS, slots[i : i + 1], row[i : i + 1], everyone[:1], None) for i in range(3)]
        for got, want in zip(batched, zip(*single, strict=True), strict=True):
            np.testing.assert_array_equal(got, np.concatenate(want))


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        DynamicThreshold(1.0, alpha=0.0)
