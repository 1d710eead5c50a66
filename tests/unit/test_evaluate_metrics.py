"""Benchmark metric functions against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.metrics import card_precision_at_k, pointwise, ranking, segment_counts, segment_f1, segments
from pipeline.evaluate.nasa import merge


def test_pointwise_skab_definitions() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    p = np.array([0, 1, 0, 0, 1, 1, 0, 0, 0, 0])
    r = pointwise(y, p)
    # TP=2 FP=1 FN=2 TN=5
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (2, 1, 2, 5)
    assert r["f1"] == pytest.approx(2 / (2 + 1.5))
    assert r["far"] == pytest.approx(1 / 6)
    assert r["mar"] == pytest.approx(2 / 4)


def test_segments_runs() -> None:
    assert segments(np.array([1, 1, 0, 0, 1, 0, 1, 1, 1])) == [(0, 1), (4, 4), (6, 8)]
    assert segments(np.zeros(5)) == []


def test_orion_overlap_counts() -> None:
    labeled = [(10, 20), (50, 60), (90, 95)]
    predicted = [(15, 16), (18, 30), (40, 45), (61, 70), (95, 99)]
    # (10,20) hit twice -> one TP; (50,60) missed; (90,95) hit at 95; (40,45) and (61,70) are FPs
    assert segment_counts(labeled, predicted) == (2, 2, 1)


def test_segment_f1_sums_over_signals() -> None:
    r = segment_f1([([(0, 5)], [(3, 4)]), ([(10, 12)], [(0, 1), (20, 22)]), ([], [(1, 2)])])
    # TP=1, FP=3, FN=1
    assert (r["tp"], r["fp"], r["fn"]) == (1, 3, 1)
    assert r["precision"] == pytest.approx(0.25)
    assert r["recall"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)


def test_merge_close_segments() -> None:
    assert merge([(0, 2), (5, 6), (20, 21)], gap=3) == [(0, 6), (20, 21)]


def test_card_precision_at_k_with_detected_removal() -> None:
    day = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    card = np.array(["a", "b", "c", "a", "a", "b", "c", "d"])
    score = np.array([0.9, 0.1, 0.5, 0.2, 0.95, 0.9, 0.1, 0.8])
    fraud = np.array([1, 0, 0, 0, 1, 1, 0, 0])
    # day 0: cards by max score a(0.9, fraud) c(0.5) -> top-2 has 1 fraud -> 0.5; "a" is detected
    # day 1: "a" removed; b(0.9, fraud) d(0.8) -> 0.5
    assert card_precision_at_k(day, card, score, fraud, k=2) == pytest.approx(0.5)
    # without removal day 1 top-2 = a, b -> 1.0
    assert card_precision_at_k(day, card, score, fraud, k=2, remove_detected=False) == pytest.approx(0.75)


def test_ranking_metrics() -> None:
    r = ranking(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert r["roc_auc"] == pytest.approx(0.75)
    assert r["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
