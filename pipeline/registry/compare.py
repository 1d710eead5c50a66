"""Champion against challenger on the same events: pure math over alerts and score samples, no IO.

Operator labels live on the champion's alerts, but a label describes the EVENT, so it counts for either
version's alert on that event: precision is measured on the events that carry a label, for both versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

QUANTILE_LEVELS = (0.5, 0.9, 0.99, 0.999)


@dataclass(frozen=True)
class AlertRef:
    """One alert as the comparison sees it. event_key names the source record (topic|partition|offset)."""

    entity_id: str
    event_key: str
    label: str | None = None  # "tp" | "fp" | None (not labelled)


@dataclass(frozen=True)
class VersionSummary:
    version: str
    alerts: int
    alerts_per_hour: float | None  # None: no time window to divide by
    entities: int
    labelled: int  # of its alerts, those on a labelled event
    precision: float | None  # tp / labelled; None when nothing is labelled
    score_quantiles: dict[float, float] | None  # None: no score samples
    scores: int


@dataclass(frozen=True)
class Comparison:
    a: VersionSummary
    b: VersionSummary
    entity_jaccard: float | None  # None: neither version alerted, so there is no overlap to measure
    event_jaccard: float | None
    events_both: int
    events_only_a: int
    events_only_b: int


def jaccard(x: set[str], y: set[str]) -> float | None:
    """|x & y| / |x | y|; None for two empty sets (no alerts on either side is not a perfect overlap)."""
    union = x | y
    return len(x & y) / len(union) if union else None


def score_quantiles(
    scores: Sequence[float] | np.ndarray, levels: Sequence[float] = QUANTILE_LEVELS
) -> dict[float, float] | None:
    x = np.asarray(scores, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    return {level: float(v) for level, v in zip(levels, np.quantile(x, levels), strict=True)}


def event_labels(*alert_sets: Sequence[AlertRef]) -> dict[str, str]:
    """{event_key: label} over all given alerts; conflicting labels on one event: a true positive wins (an
    operator confirmed the event anomalous at least once)."""
    labels: dict[str, str] = {}
    for alerts in alert_sets:
        for a in alerts:
            if a.label in ("tp", "fp") and labels.get(a.event_key) != "tp":
                labels[a.event_key] = a.label
    return labels


def summarize(
    version: str,
    alerts: Sequence[AlertRef],
    scores: Sequence[float] | np.ndarray,
    labels: dict[str, str],
    window_s: float | None,
) -> VersionSummary:
    events = {a.event_key for a in alerts}
    judged = [labels[e] for e in events if e in labels]
    return VersionSummary(
        version=version,
        alerts=len(alerts),
        alerts_per_hour=len(alerts) / (window_s / 3600.0) if window_s else None,
        entities=len({a.entity_id for a in alerts}),
        labelled=len(judged),
        precision=judged.count("tp") / len(judged) if judged else None,
        score_quantiles=score_quantiles(scores),
        scores=len(scores),
    )


def compare(
    version_a: str,
    alerts_a: Sequence[AlertRef],
    scores_a: Sequence[float] | np.ndarray,
    version_b: str,
    alerts_b: Sequence[AlertRef],
    scores_b: Sequence[float] | np.ndarray,
    window_s: float | None,
) -> Comparison:
    """Both versions' figures over the same window (seconds; None: rates are not computed)."""
    labels = event_labels(alerts_a, alerts_b)
    events_a = {a.event_key for a in alerts_a}
    events_b = {b.event_key for b in alerts_b}
    return Comparison(
        a=summarize(version_a, alerts_a, scores_a, labels, window_s),
        b=summarize(version_b, alerts_b, scores_b, labels, window_s),
        entity_jaccard=jaccard({a.entity_id for a in alerts_a}, {b.entity_id for b in alerts_b}),
        event_jaccard=jaccard(events_a, events_b),
        events_both=len(events_a & events_b),
        events_only_a=len(events_a - events_b),
        events_only_b=len(events_b - events_a),
    )
