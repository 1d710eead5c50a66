"""Benchmark metrics, each a small pure function so it can be checked against hand-computed cases.

Definitions follow the benchmarks' own code: SKAB (point-wise F1/FAR/MAR), Orion (segment overlap),
Fraud Detection Handbook (Card Precision@k with already-detected cards removed on later days).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd


def pointwise(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """SKAB: F1 = TP/(TP+(FP+FN)/2), FAR = FP/(FP+TN), MAR = FN/(FN+TP); pooled over all points."""
    t = np.asarray(y_true, bool)
    p = np.asarray(y_pred, bool)
    tp = int((t & p).sum())
    fp = int((~t & p).sum())
    fn = int((t & ~p).sum())
    tn = int((~t & ~p).sum())
    return pointwise_from_counts(tp, fp, fn, tn)


def pointwise_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """SKAB's metrics from point counts (also for counts pooled over several folders)."""
    return {
        "f1": tp / (tp + (fp + fn) / 2) if tp + fp + fn else 1.0,
        "far": fp / (fp + tn) if fp + tn else 0.0,
        "mar": fn / (fn + tp) if fn + tp else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def segments(mask: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True as inclusive (start, end) index pairs."""
    m = np.asarray(mask, bool).astype(np.int8)
    d = np.diff(np.r_[0, m, 0])
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1) - 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def segment_counts(labeled: Sequence[tuple[int, int]], predicted: Sequence[tuple[int, int]]) -> tuple[int, int, int]:
    """Orion overlap counts for one signal: (TP, FP, FN).

    TP: a labeled segment overlapped by any prediction; FN: one overlapped by none;
    FP: a predicted segment overlapping no labeled segment. Segments are inclusive (start, end).
    """
    tp = sum(any(_overlaps(t, p) for p in predicted) for t in labeled)
    fp = sum(not any(_overlaps(p, t) for t in labeled) for p in predicted)
    return tp, fp, len(labeled) - tp


def segment_f1(per_signal: Iterable[tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]]]]) -> dict[str, float]:
    """Counts summed over signals (labeled, predicted), then precision, recall and F1."""
    tp = fp = fn = 0
    for labeled, predicted in per_signal:
        a, b, c = segment_counts(labeled, predicted)
        tp, fp, fn = tp + a, fp + b, fn + c
    return segment_f1_from_counts(tp, fp, fn)


def segment_f1_from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1 from segment counts (also for counts pooled over several folders)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}


def card_precision_at_k(
    day: np.ndarray,
    card: np.ndarray,
    score: np.ndarray,
    fraud: np.ndarray,
    k: int = 100,
    remove_detected: bool = True,
) -> float:
    """Fraud Detection Handbook CP@k: per day, rank cards by their highest transaction score, take the
    top k, count the cards with a fraud that day, divide by k; mean over days. As in the handbook, cards
    already detected (a fraud card in an earlier day's top k) are removed from later days."""
    df = pd.DataFrame({"day": day, "card": card, "score": score, "fraud": np.asarray(fraud, int)})
    detected: set[object] = set()
    per_day = []
    for _, d in df.groupby("day", sort=True):
        if remove_detected and detected:
            d = d[~d["card"].isin(detected)]
        cards = d.groupby("card")[["score", "fraud"]].max().sort_values("score", ascending=False, kind="stable")
        top = cards.head(k)
        hits = top.index[top["fraud"].to_numpy() == 1]
        per_day.append(len(hits) / k)
        if remove_detected:
            detected.update(hits.tolist())
    return float(np.mean(per_day)) if per_day else 0.0


def ranking(y_true: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """ROC AUC and average precision (scikit-learn), the threshold-free transaction metrics."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true, int)
    s = np.asarray(score, np.float64)
    return {"roc_auc": float(roc_auc_score(y, s)), "average_precision": float(average_precision_score(y, s))}
