"""The adaptive threshold's state: hysteresis (ThresholdKnobs.z_release: enter an alert at z, leave it below
z_release; the alert state is entity state, snapshotted, left alone by late events) and the young-entity threshold."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.scoring.threshold import AdaptiveThreshold
from pipeline.state.store import EntityStateStore, StateLayout


def _warm_store() -> tuple[EntityStateStore, np.ndarray]:
    """One warm entity whose normal log1p-scores have mean 0 and std 1: its threshold at z is e^z - 1."""
    s = EntityStateStore(StateLayout(4, 2), np.zeros(2), np.ones(2), capacity=4)
    slots = s.resolve(["a"])
    s.score_n[slots], s.score_mean[slots], s.score_m2[slots] = 101.0, 0.0, 100.0
    return s, slots


def _run(thr: AdaptiveThreshold, s: EntityStateStore, slots: np.ndarray, scores: list[float]) -> list[bool]:
    one = np.ones(1, bool)
    return [bool(thr.classify(s.score_stats(), slots, np.array([x]), one, None).is_anomaly[0]) for x in scores]


SCORES = [5.0, 25.0, 5.0, 2.0, 1.0, 5.0, 25.0]  # open threshold e^3 - 1 = 19.1, release e^1 - 1 = 1.72


def test_an_alert_holds_until_the_score_falls_below_the_release_threshold() -> None:
    s, slots = _warm_store()
    with_hysteresis = AdaptiveThreshold(1.0, ThresholdKnobs(z=3.0, z_release=1.0, floor_ratio=0.0))
    assert _run(with_hysteresis, s, slots, SCORES) == [False, True, True, True, False, False, True]
    s, slots = _warm_store()
    plain = AdaptiveThreshold(1.0, ThresholdKnobs(z=3.0, floor_ratio=0.0))
    assert _run(plain, s, slots, SCORES) == [False, True, False, False, False, False, True]
    assert not s.alerting[slots][0]  # without hysteresis the alert state is not kept


def test_the_verdict_reports_the_threshold_it_applied() -> None:
    s, slots = _warm_store()
    thr = AdaptiveThreshold(1.0, ThresholdKnobs(z=3.0, z_release=1.0, floor_ratio=0.0))
    one = np.ones(1, bool)
    first = thr.classify(s.score_stats(), slots, np.array([25.0]), one, None)
    second = thr.classify(s.score_stats(), slots, np.array([5.0]), one, None)
    assert first.thresholds[0] == pytest.approx(np.expm1(3.0))
    assert second.thresholds[0] == pytest.approx(np.expm1(1.0))


def test_late_events_leave_the_alert_state_alone() -> None:
    s, slots = _warm_store()
    thr = AdaptiveThreshold(1.0, ThresholdKnobs(z=3.0, z_release=1.0, floor_ratio=0.0))
    one = np.ones(1, bool)
    thr.classify(s.score_stats(), slots, np.array([25.0]), one, None)
    late = thr.classify(s.score_stats(), slots, np.array([0.5]), one, np.ones(1, bool))
    assert not late.is_anomaly[0] and s.alerting[slots][0]  # judged, but the entity is still in its alert
    assert thr.classify(s.score_stats(), slots, np.array([5.0]), one, None).is_anomaly[0]


def test_ineligible_events_end_an_alert() -> None:
    """An event that cannot alert (min_history, a rejected event) is judged normal, and the run ends there."""
    s, slots = _warm_store()
    thr = AdaptiveThreshold(1.0, ThresholdKnobs(z=3.0, z_release=1.0, floor_ratio=0.0))
    thr.classify(s.score_stats(), slots, np.array([25.0]), np.ones(1, bool), None)
    assert not thr.classify(s.score_stats(), slots, np.array([25.0]), np.zeros(1, bool), None).is_anomaly[0]
    assert not s.alerting[slots][0]


def test_alert_state_survives_a_snapshot_and_older_records_load_without_it() -> None:
    s, slots = _warm_store()
    s.alerting[slots] = True
    blob = s.snapshot(slots)[0]
    restored = EntityStateStore(StateLayout(4, 2), np.zeros(2), np.ones(2), capacity=4)
    restored.admit({"a": blob})
    assert restored.alerting[restored.resolve(["a"])][0]
    v3 = s.layout.dtype_of(3)  # a record written before the alert state was kept
    rec = np.zeros(1, v3)
    full = np.frombuffer(blob, s.layout.dtype)[0]
    for name in v3.names or ():
        rec[name] = full[name]
    rec["version"] = 3
    old = EntityStateStore(StateLayout(4, 2), np.zeros(2), np.ones(2), capacity=4)
    old.admit({"a": rec.tobytes()})
    o = old.resolve(["a"])
    assert not old.alerting[o][0] and old.score_n[o][0] == 101.0


def test_release_above_z_is_refused() -> None:
    with pytest.raises(ValueError, match="z_release"):
        ThresholdKnobs(z=2.0, z_release=2.5)


def test_the_service_reads_the_release_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import Settings

    assert Settings().threshold.z_release is None
    monkeypatch.setenv("PIPELINE_THRESHOLD_Z_RELEASE", "1.5")
    assert Settings().threshold.z_release == 1.5


def test_young_entities_are_judged_by_the_young_threshold_warm_ones_by_their_own() -> None:
    s = EntityStateStore(StateLayout(4, 2), np.zeros(2), np.ones(2), capacity=4)
    slots = s.resolve(["young", "warm"])
    s.score_n[slots[1]], s.score_mean[slots[1]], s.score_m2[slots[1]] = 101.0, 0.0, 100.0  # own: e^3 - 1 = 19.1
    thr = AdaptiveThreshold(10.0, ThresholdKnobs(z=3.0, floor_ratio=0.0), young_threshold=30.0)
    v = thr.classify(s.score_stats(), slots, np.array([25.0, 25.0]), np.ones(2, bool), None)
    assert v.thresholds.tolist() == pytest.approx([30.0, np.expm1(3.0)])
    assert v.is_anomaly.tolist() == [False, True]
    floored = AdaptiveThreshold(10.0, ThresholdKnobs(z=0.0, floor_ratio=1.0), young_threshold=30.0)
    assert floored.thresholds(s.score_stats(), slots)[1] == 10.0  # the floor is the settled global threshold


def test_a_smoothed_young_entity_is_judged_by_its_raw_score_and_learns_the_smoothed_one() -> None:
    """The model's thresholds (global, young) were calibrated on raw scores, so a young entity's raw score meets
    them; the entity's own statistics stay those of its smoothed scores."""
    s = EntityStateStore(StateLayout(4, 2), np.zeros(2), np.ones(2), capacity=4)
    slots = s.resolve(["a"])
    thr = AdaptiveThreshold(10.0, ThresholdKnobs(warmup=3, smoothing=0.5, floor_ratio=0.0))
    one = np.ones(1, bool)
    first = thr.classify(s.score_stats(), slots, np.array([1.0]), one, None)
    thr.observe(s.score_stats(), slots, first.scores, ~first.is_anomaly)
    spike = thr.classify(s.score_stats(), slots, np.array([20.0]), one, None)
    assert spike.scores[0] == 20.0 and spike.is_anomaly[0]  # raw 20 > 10; the smoothed score would not be
    assert np.expm1(s.score_ema[slots][0]) < 10.0
    assert s.score_mean[slots][0] == pytest.approx(np.log1p(1.0))  # learned: the first event's smoothed score
