"""Drift math against a model card: PSI over the card's quantiles, per-channel input drift, warming share."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.registry import drift

LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def _quantiles(sample: np.ndarray) -> dict[str, float]:
    return {str(level): float(v) for level, v in zip(LEVELS, np.quantile(sample, LEVELS), strict=True)}


def _card(seed: int = 0) -> tuple[dict[str, object], np.ndarray, np.ndarray]:
    """A card whose score quantiles come from held-out normal scores (gamma) and whose channel statistics
    come from training values (normal), as training writes them."""
    rng = np.random.default_rng(seed)
    scores = rng.gamma(2.0, 3.0, 20_000)
    temperature = rng.normal(60.0, 4.0, 20_000)
    card = {
        "metrics": {"val_score_quantiles": _quantiles(scores)},
        "channel_stats": {
            "temperature": {
                "mean": float(temperature.mean()),
                "std": float(temperature.std()),
                "quantiles": _quantiles(temperature),
            }
        },
    }
    return card, scores, temperature


def test_psi_matches_the_formula_on_a_hand_example() -> None:
    # one quantile (the median, 0.0): expected shares 0.5 / 0.5; live 3 of 4 at or below it
    value = drift.psi([-1.0, -0.5, 0.0, 2.0], np.array([0.5]), np.array([0.0]))
    assert value == pytest.approx(0.25 * math.log(1.5) - 0.25 * math.log(0.5))


def test_score_psi_stays_flat_without_shift_and_rises_with_it() -> None:
    card, _, _ = _card()
    live = np.random.default_rng(1).gamma(2.0, 3.0, 5_000)
    flat = drift.score_psi(live, card)
    shifted = drift.score_psi(live * 1.6, card)
    assert flat < 0.1 and drift.reading(flat) == "stable"
    assert shifted > drift.SHIFT_ABOVE and drift.reading(shifted) == "shift"
    assert drift.score_psi(live * 1.1, card) < shifted  # grows with the shift


def test_channel_drift_psi_and_standardized_mean_shift() -> None:
    card, _, _ = _card()
    stats = card["channel_stats"]
    assert isinstance(stats, dict)
    live = np.random.default_rng(2).normal(60.0, 4.0, 5_000)
    (flat,) = drift.channel_drift({"temperature": live}, stats)
    (moved,) = drift.channel_drift({"temperature": live + 4.0}, stats)  # one training std up
    assert flat.channel == "temperature" and flat.n == 5_000
    assert flat.psi is not None and flat.psi < 0.1 and abs(flat.mean_shift) < 0.1
    assert moved.psi is not None and moved.psi > drift.SHIFT_ABOVE
    assert moved.mean_shift == pytest.approx(1.0, abs=0.1)


def test_channel_drift_leaves_out_channels_without_live_values_and_skips_non_finite() -> None:
    stats = {"a": {"mean": 0.0, "std": 1.0}, "b": {"mean": 0.0, "std": 1.0}}
    (only,) = drift.channel_drift({"a": [1.0, float("nan"), 3.0], "b": []}, stats)
    assert only.channel == "a" and only.n == 2 and only.psi is None and only.mean_shift == pytest.approx(2.0)


def test_tied_quantiles_make_one_bin_edge() -> None:
    # a score that is often exactly 0: the 0.1 and 0.25 quantiles tie; P(X <= 0) = 0.25
    levels, values = drift.quantile_table({"0.1": 0.0, "0.25": 0.0, "0.5": 1.0, "0.9": 3.0})
    live = np.concatenate([np.zeros(250), np.full(250, 0.5), np.full(400, 2.0), np.full(100, 5.0)])
    assert drift.psi(live, levels, values) == pytest.approx(0.0, abs=1e-12)


def test_empty_bins_count_through_the_epsilon_floor() -> None:
    levels, values = drift.quantile_table({"0.5": 0.0})
    value = drift.psi(np.full(100, -1.0), levels, values)  # every live value below the median
    assert value > 1.0 and math.isfinite(value)


def test_cards_without_score_quantiles_use_their_val_score_percentiles() -> None:
    card = {"metrics": {"val_mse": 0.1, "val_score_p50": 6.3, "val_score_p99": 34.7}}
    assert drift.card_score_quantiles(card) == {"0.50": 6.3, "0.99": 34.7}
    both = {"metrics": {**card["metrics"], "val_score_quantiles": {"0.5": 6.0, "0.999": 50.0}}}
    assert drift.card_score_quantiles(both) == {"0.5": 6.0, "0.999": 50.0}
    with pytest.raises(ValueError, match="score quantiles"):
        drift.card_score_quantiles({"metrics": {"val_mse": 0.1}})


@pytest.mark.parametrize(
    ("quantiles", "message"),
    [
        ({}, "no quantiles"),
        ({"0": 1.0}, "strictly between 0 and 1"),
        ({"0.5": 2.0, "0.9": 1.0}, "non-decreasing"),
        ({"0.5": float("inf")}, "finite"),
    ],
)
def test_bad_quantile_tables_are_refused(quantiles: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        drift.quantile_table(quantiles)


def test_psi_needs_live_values() -> None:
    with pytest.raises(ValueError, match="no finite live values"):
        drift.psi([float("nan")], np.array([0.5]), np.array([0.0]))


def test_warming_share() -> None:
    assert drift.warming_share(3, 12) == 0.25
    assert drift.warming_share(0, 0) == 0.0
    with pytest.raises(ValueError):
        drift.warming_share(5, 4)
