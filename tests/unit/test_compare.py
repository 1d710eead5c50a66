"""Champion vs challenger math: rates, overlap, precision on labelled events, score quantiles."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.registry.compare import AlertRef, compare, jaccard, score_quantiles


def test_jaccard() -> None:
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) is None  # nothing to compare, not a perfect overlap
    assert jaccard({"a"}, set()) == 0.0


def test_compare_counts_overlap_rates_and_precision_on_labelled_events() -> None:
    champion = [
        AlertRef("M1", "t|0|1", "tp"),
        AlertRef("M1", "t|0|2", "fp"),
        AlertRef("M2", "t|1|7", None),
        AlertRef("M3", "t|1|9", "fp"),
    ]
    # the challenger's rows are shadow rows: unlabelled, but the labels of the same events count for it
    challenger = [AlertRef("M1", "t|0|1"), AlertRef("M2", "t|1|7"), AlertRef("M4", "t|2|3")]
    c = compare("pumps-v1", champion, [1.0, 2.0, 3.0], "pumps-v2", challenger, [], window_s=7200.0)
    assert (c.a.alerts, c.b.alerts) == (4, 3)
    assert (c.a.alerts_per_hour, c.b.alerts_per_hour) == (2.0, 1.5)
    assert (c.a.entities, c.b.entities) == (3, 3)
    assert c.entity_jaccard == pytest.approx(2 / 4)  # M1, M2 of M1..M4
    assert c.event_jaccard == pytest.approx(2 / 5)
    assert (c.events_both, c.events_only_a, c.events_only_b) == (2, 2, 1)
    assert (c.a.labelled, c.a.precision) == (3, pytest.approx(1 / 3))
    assert (c.b.labelled, c.b.precision) == (1, 1.0)  # only t|0|1 is labelled among its events
    assert c.a.score_quantiles is not None and c.a.score_quantiles[0.5] == 2.0
    assert c.b.score_quantiles is None and c.b.scores == 0


def test_a_true_positive_label_wins_over_a_false_positive_on_the_same_event() -> None:
    a = [AlertRef("M1", "e1", "fp")]
    b = [AlertRef("M1", "e1", "tp")]
    c = compare("v1", a, [], "v2", b, [], window_s=None)
    assert c.a.precision == 1.0 and c.b.precision == 1.0
    assert c.a.alerts_per_hour is None


def test_nothing_labelled_gives_no_precision() -> None:
    c = compare("v1", [AlertRef("M1", "e1")], [], "v2", [], [], window_s=3600.0)
    assert c.a.precision is None and c.a.labelled == 0 and c.b.alerts_per_hour == 0.0


def test_score_quantiles_skip_non_finite_scores() -> None:
    q = score_quantiles(np.array([1.0, 2.0, 3.0, float("nan")]), levels=(0.5,))
    assert q == {0.5: 2.0}
    assert score_quantiles([], levels=(0.5,)) is None
