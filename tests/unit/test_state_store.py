"""Entity state: ring windows, snapshots that restore exactly, bounded memory, no silent resets."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import StateError
from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.scoring.threshold import AdaptiveThreshold
from pipeline.state.rounds import occurrence_rank, rounds
from pipeline.state.store import RING, SLOT_ARRAYS, EntityStateStore, StateLayout

THRESHOLD = AdaptiveThreshold(3.0, ThresholdKnobs(warmup=2, z=4.0, floor_ratio=0.5))


def _store() -> EntityStateStore:
    return EntityStateStore(StateLayout(4, 2), np.zeros(2), np.ones(2), capacity=2)


def test_window_is_ordered_oldest_to_newest_and_prefilled() -> None:
    s = _store()
    slots = s.resolve(["a"])
    s.push(slots, np.array([[1.0, 10.0]]), np.array([1.0]))
    assert s.windows(slots)[0, :, 0].tolist() == [1, 1, 1, 1]
    for v in (2, 3, 4, 5, 6):
        s.push(slots, np.array([[v, 10.0 * v]]), np.array([float(v)]))
    assert s.windows(slots)[0, :, 0].tolist() == [3, 4, 5, 6]
    assert int(s.count[slots[0]]) == 6


def test_restart_context_refills_the_window_and_keeps_the_scaling() -> None:
    s = _store()
    slots = s.resolve(["a", "b"])
    for v in (1.0, 2.0, 3.0):
        feats = np.array([[v, -v], [10 * v, 0.0]])
        s.push(slots, feats, np.array([v, v]))
        s.update_feature_stats(slots, feats)
    scaling = s.scaling(slots)
    s.restart_context(slots[:1])
    assert s.count[slots].tolist() == [0, 3] and bool(s.dirty[slots[0]])
    np.testing.assert_array_equal(s.scaling(slots)[0], scaling[0])
    s.push(slots, np.array([[9.0, -9.0], [40.0, 0.0]]), np.array([9.0, 9.0]))
    assert s.windows(slots)[0, :, 0].tolist() == [9, 9, 9, 9]  # a fresh context: prefilled, as a new entity
    assert s.windows(slots)[1, :, 0].tolist() == [10, 20, 30, 40]


def test_snapshot_round_trip_restores_exactly() -> None:
    s = _store()
    rng = np.random.default_rng(0)
    ids = [f"e{i}" for i in range(20)]  # grows past the initial capacity
    slots = s.resolve(ids)
    for t in range(7):
        feats = rng.normal(size=(20, 2))
        s.push(slots, feats, np.full(20, float(t)))
        s.update_feature_stats(slots, feats)
        THRESHOLD.observe(s.score_stats(), slots, rng.uniform(0, 5, 20), np.ones(20, bool))
    blobs = dict(zip(ids, s.snapshot(slots), strict=True))
    restored = _store()
    restored.admit(blobs)
    r = restored.resolve(ids)
    np.testing.assert_array_equal(restored.windows(r), s.windows(slots))
    for a, b in zip(restored.scaling(r), s.scaling(slots), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        THRESHOLD.thresholds(restored.score_stats(), r), THRESHOLD.thresholds(s.score_stats(), slots)
    )
    # and they evolve identically afterwards
    feats = rng.normal(size=(20, 2))
    for st, sl in ((s, slots), (restored, r)):
        st.push(sl, feats, np.full(20, 9.0))
    np.testing.assert_array_equal(restored.windows(r), s.windows(slots))


def test_snapshot_of_another_window_keeps_statistics_and_bytes_of_no_record_raise() -> None:
    s = _store()
    slots = s.resolve(["a"])
    s.push(slots, np.ones((1, 2)), np.array([5.0]))
    s.update_feature_stats(slots, np.ones((1, 2)))
    blob = s.snapshot(slots)[0]
    other = EntityStateStore(StateLayout(8, 2), np.zeros(2), np.ones(2))
    other.admit({"a": blob})
    o = other.resolve(["a"])
    assert other.feat_n[o][0] == 1 and other.last_ts[o][0] == 5.0 and other.carried_over == 1
    assert other.count[o][0] == 0, "a window of another length is refilled, not reused"
    with pytest.raises(StateError):
        other.admit({"b": blob[:-3]})


def test_eviction_only_takes_clean_idle_entities_and_reuses_slots() -> None:
    s = _store()
    slots = s.resolve(["old", "new"])
    s.push(slots, np.zeros((2, 2)), np.array([0.0, 100.0]))
    assert s.evict_idle(now=100.0, ttl=10.0, max_live=10) == 0  # both dirty: never evicted
    s.mark_clean(slots)
    assert s.evict_idle(now=100.0, ttl=10.0, max_live=10) == 1
    assert "old" not in s and "new" in s
    s.resolve(["x"])
    assert s.capacity == 16 and len(s) == 2


def test_memory_per_entity_is_bounded() -> None:
    s = EntityStateStore(StateLayout(32, 8), np.zeros(8), np.ones(8), capacity=10_000)
    assert s.nbytes_per_entity() < 8 * 1024


def test_global_features_are_scaled_by_the_prior_only() -> None:
    from pipeline.state.store import EntityStateStore, StateLayout

    store = EntityStateStore(StateLayout(4, 2), np.array([1.0, 2.0]), np.array([3.0, 4.0]), global_features=(1,))
    slots = store.resolve(["a"])
    for v in (10.0, 12.0, 11.0, 13.0):
        store.update_feature_stats(slots, np.array([[v, v]]))
    mean, std = store.scaling(slots)
    assert mean[0, 1] == 2.0 and std[0, 1] == 4.0  # global feature: prior scaling, whatever the entity did
    assert mean[0, 0] != 1.0  # per-entity feature moved towards the entity's values
    with pytest.raises(ValueError):
        EntityStateStore(StateLayout(4, 2), np.zeros(2), np.ones(2), global_features=(2,))


def test_smoothed_score_survives_snapshots_and_v1_blobs_migrate() -> None:
    s = _store()
    slots = s.resolve(["a", "b"])
    s.push(slots, np.zeros((2, 2)), np.zeros(2))
    halves = AdaptiveThreshold(1.0, ThresholdKnobs(smoothing=0.5))
    halves.smooth(s.score_stats(), slots, np.array([3.0, 0.0]))
    out = halves.smooth(s.score_stats(), slots, np.array([1.0, 0.0]))
    assert out[0] == pytest.approx(np.expm1(0.5 * np.log1p(1.0) + 0.5 * np.log1p(3.0)))
    blobs = dict(zip(["a", "b"], s.snapshot(slots), strict=True))
    restored = _store()
    restored.admit(blobs)
    r = restored.resolve(["a", "b"])
    np.testing.assert_array_equal(restored.score_ema[r], s.score_ema[slots])
    # a snapshot written before smoothing existed (layout v1) loads with everything but the average
    v1 = s.layout.dtype_of(1)
    rec = np.zeros(1, v1)
    full = np.frombuffer(blobs["a"], s.layout.dtype)[0]
    for name in v1.names or ():
        rec[name] = full[name]
    rec["version"] = 1
    old = _store()
    old.admit({"a": rec.tobytes()})
    o = old.resolve(["a"])
    assert np.isnan(old.score_ema[o][0]) and old.count[o][0] == s.count[slots][0]
    np.testing.assert_array_equal(old.windows(o), s.windows(slots[:1]))


def test_snapshot_records_keep_their_byte_layout() -> None:
    """Blobs already in the database must stay loadable: the table that drives the record reproduces the
    layouts v1, v2, v3 and v4 field for field, with and without a stateful model's arrays."""
    w, f, r = 4, 2, 3
    head = [("version", "<u2"), ("window", "<u2"), ("n_features", "<u2"), ("count", "<i8"), ("last_ts", "<f8")]
    body = [("win", "<f4", (w, f)), ("feat_n", "<f8"), ("feat_mean", "<f8", (f,)), ("feat_m2", "<f8", (f,))]
    body += [("score_n", "<f8"), ("score_mean", "<f8"), ("score_m2", "<f8")]
    rnn = [("rnn_h", "<f4", (r,)), ("rnn_c", "<f4", (r,)), ("rnn_pred", "<f4", (f,))]
    names = [("model", "<u4"), ("features", "<u4")]  # v3: the writing model
    assert StateLayout(w, f).dtype_of(1) == np.dtype(head + body)
    assert StateLayout(w, f).dtype_of(2) == np.dtype([*head, *body, ("score_ema", "<f8")])
    assert StateLayout(w, f, r).dtype_of(1) == np.dtype(head + body + rnn)
    assert StateLayout(w, f, r).dtype_of(2) == np.dtype([*head, *body, ("score_ema", "<f8"), *rnn])
    v3 = [*head[:3], *names, *head[3:], *body, ("score_ema", "<f8")]
    assert StateLayout(w, f, r).dtype_of(3) == np.dtype([*v3, *rnn])
    assert StateLayout(w, f, r).dtype == np.dtype([*v3, ("alerting", "?"), *rnn])  # v4: the alert state


def test_savepoint_restores_every_slot_array() -> None:
    s = EntityStateStore(StateLayout(3, 2, 2), np.zeros(2), np.ones(2), capacity=2)
    slots = s.resolve(["a", "b"], np.array([0, 1]))
    s.push(slots, np.ones((2, 2)), np.array([1.0, 2.0]))
    before = {a.name: getattr(s, a.name).copy() for a in SLOT_ARRAYS}
    batch = s.resolve(["a", "c", "a"])  # "c" is new
    undo = s.savepoint(batch)
    for idx in rounds(occurrence_rank(batch)):  # the ring rows the batch writes
        s.push(batch[idx], np.full((len(idx), 2), 9.0), np.full(len(idx), 3.0))
    for a in SLOT_ARRAYS:
        if a.name != RING:
            getattr(s, a.name)[batch] = 7
    undo()
    for a in SLOT_ARRAYS:
        np.testing.assert_array_equal(getattr(s, a.name)[slots], before[a.name][slots], err_msg=a.name)
