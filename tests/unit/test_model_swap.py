"""A promoted model taking over a stream's entities (pipeline.state.store.CarryOver, EntityStateStore.adopt and
the restore of another model's snapshot): the feature scaling carries over where the features are the same,
the autoencoder window where its length is the same too; score statistics (another model's scores) and a
stateful model's (h, c) never; and the swapped stream's partitions are snapshotted at the next checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.lstm_ae import load_blob
from pipeline.processing.snapshots import Snapshots
from pipeline.processing.swap import ModelWatcher, Swaps
from pipeline.registry.registry import ModelRegistry
from pipeline.scoring.factory import build_scorer
from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.scoring.scorer import StreamScorer
from pipeline.scoring.threshold import AdaptiveThreshold
from pipeline.simulate import simulate_sensors, strip_labels
from pipeline.sinks import Database
from pipeline.sinks.registry import SqlRegistryStore
from pipeline.state.partition import Partitions
from pipeline.state.store import SCORES, SLOT_ARRAYS, STATS, WINDOW, EntityStateStore, StateLayout
from pipeline.streams.config import Stream, parse_streams
from pipeline.streams.serving import ServedStream, resolve_model

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "sensors.pt"
FEATURES = ["a", "b"]
THRESHOLD = AdaptiveThreshold(3.0, ThresholdKnobs(warmup=2, z=4.0))


def _store(version: str, window: int = 4, features: list[str] = FEATURES, recurrent: int = 0) -> EntityStateStore:
    layout = StateLayout.of_model(window, features, recurrent, version)
    return EntityStateStore(layout, np.zeros(len(features)), np.ones(len(features)))


def _served(store: EntityStateStore, ids: list[str], events: int = 6) -> np.ndarray:
    """`events` events of each entity, applied as the scorer applies them; a step of (h, c) where it has one."""
    rng = np.random.default_rng(1)
    slots = store.resolve(ids, np.arange(len(ids), dtype=np.int32) % 2)
    for t in range(events):
        feats = rng.normal(size=(len(ids), store.layout.n_features))
        store.push(slots, feats, np.full(len(ids), float(t)))
        store.update_feature_stats(slots, feats)
        THRESHOLD.observe(store.score_stats(), slots, rng.uniform(0, 5, len(ids)), np.ones(len(ids), bool))
        THRESHOLD.smooth(store.score_stats(), slots, rng.uniform(0, 5, len(ids)))
        if store.layout.recurrent:
            store.rnn_h[slots] = store.rnn_c[slots] = rng.normal(size=(len(ids), store.layout.recurrent))
            store.rnn_pred[slots] = feats
    store.mark_clean(slots)
    return slots


def _arrays(store: EntityStateStore, slots: np.ndarray, carry: str) -> dict[str, np.ndarray]:
    return {a.name: getattr(store, a.name)[slots] for a in SLOT_ARRAYS if a.carry == carry}


def _fresh_scores(store: EntityStateStore, slots: np.ndarray) -> None:
    for a in SLOT_ARRAYS:
        if a.carry == SCORES:
            np.testing.assert_array_equal(
                getattr(store, a.name)[slots], np.full(len(slots), a.fresh, getattr(store, a.name).dtype), a.name
            )


def test_a_new_autoencoder_version_keeps_scaling_and_window_and_relearns_score_statistics() -> None:
    old, new = _store("pumps-v1"), _store("pumps-v2")
    ids = ["p1", "p2", "p3"]
    src = _served(old, ids)
    assert (old.score_n[src] > 0).all()
    carry = new.adopt(old)
    assert not carry.same_model and carry.stats and carry.window
    assert "score statistics re-learnt" in carry.describe()
    dst = new.resolve(ids)
    for carried in (STATS, WINDOW):
        for name, values in _arrays(old, src, carried).items():
            np.testing.assert_array_equal(_arrays(new, dst, carried)[name], values, err_msg=name)
    np.testing.assert_array_equal(new.windows(dst), old.windows(src))
    np.testing.assert_array_equal(new.partition[dst], old.partition[src])
    # the old version's scores say nothing about the new one's scale: its global threshold judges them
    _fresh_scores(new, dst)
    np.testing.assert_array_equal(THRESHOLD.thresholds(new.score_stats(), dst), [3.0, 3.0, 3.0])
    assert new.dirty[dst].all(), "the next snapshot must write them under the new layout"


def test_the_same_version_keeps_its_score_statistics() -> None:
    old, new = _store("pumps-v1"), _store("pumps-v1")
    src = _served(old, ["p1", "p2"])
    assert new.adopt(old).same_model
    dst = new.resolve(["p1", "p2"])
    for name, values in _arrays(old, src, SCORES).items():
        np.testing.assert_array_equal(getattr(new, name)[dst], values, err_msg=name)


def test_a_new_stateful_version_resets_h_c_and_score_statistics_but_keeps_scaling() -> None:
    old, new = _store("pumps-v1", 1, recurrent=3), _store("pumps-v2", 1, recurrent=3)
    ids = ["p1", "p2"]
    src = _served(old, ids)
    carry = new.adopt(old)
    assert carry.stats and not carry.window
    dst = new.resolve(ids)
    for name, values in _arrays(old, src, STATS).items():
        np.testing.assert_array_equal(getattr(new, name)[dst], values, err_msg=name)
    _fresh_scores(new, dst)
    assert (new.rnn_h[dst] == 0).all() and (new.rnn_c[dst] == 0).all() and np.isnan(new.rnn_pred[dst]).all()
    assert (new.count[dst] == 0).all(), "min_history events before the new model's first alert"
    np.testing.assert_array_equal(new.last_ts[dst], old.last_ts[src])


def test_other_features_rewarm_on_the_global_threshold() -> None:
    old, new = _store("pumps-v1"), _store("pumps-v2", features=["b", "a"])
    ids = ["p1", "p2"]
    src = _served(old, ids)
    carry = new.adopt(old)
    assert not carry.stats and not carry.window and "global threshold" in carry.describe()
    dst = new.resolve(ids)
    assert (new.feat_n[dst] == 0).all() and (new.score_n[dst] == 0).all() and (new.count[dst] == 0).all()
    np.testing.assert_array_equal(THRESHOLD.thresholds(new.score_stats(), dst), [3.0, 3.0])
    np.testing.assert_array_equal(new.last_ts[dst], old.last_ts[src])


@pytest.mark.parametrize(
    ("window", "features", "recurrent", "stats", "window_kept"),
    [
        (4, FEATURES, 0, True, True),
        (8, FEATURES, 0, True, False),
        (4, ["b", "a"], 0, False, False),
        (4, FEATURES, 2, True, False),
    ],
)
def test_a_snapshot_of_another_model_restores_what_carries_over(
    window: int, features: list[str], recurrent: int, stats: bool, window_kept: bool
) -> None:
    """An entity evicted (or on a partition not yet read) when the version changed comes back from a snapshot
    the old model wrote: the same rules as for the live entities, counted, never a crash."""
    old = _store("pumps-v1")
    src = _served(old, ["p1"])
    blob = old.snapshot(src)[0]
    new = _store("pumps-v2", window, features, recurrent)
    new.admit({"p1": blob})
    dst = new.resolve(["p1"])
    assert new.carried_over == 1
    assert (new.feat_n[dst] == old.feat_n[src]).all() == stats
    assert (new.score_n[dst] == 0).all(), "another model's score statistics never carry over"
    assert (new.count[dst] == old.count[src]).all() == window_kept
    assert new.last_ts[dst][0] == old.last_ts[src][0]
    # and the same model's own snapshot restores everything, uncounted
    same = _store("pumps-v1")
    same.admit({"p1": blob})
    np.testing.assert_array_equal(same.windows(same.resolve(["p1"])), old.windows(src))
    assert same.carried_over == 0


def test_a_swapped_stream_is_snapshotted_whole_at_the_next_checkpoint() -> None:
    parts = Partitions()
    for p in range(3):
        parts.assign(("pumps", p)).advance(10)
    parts.assign(("fans", 0)).advance(5)
    replaying = parts.assign(("pumps", 3))
    replaying.consumed, replaying.committed = 2, 9
    snaps = Snapshots({}, parts, lambda tp: {tp})
    snaps.stagger([st.tp for st in parts], now=0.0, every=100.0)
    assert snaps.due(1.0) == set()
    snaps.force("pumps")
    due = snaps.due(1.0)
    assert due == {("pumps", 0), ("pumps", 1), ("pumps", 2)}, "replaying partitions wait until they caught up"
    snaps.taken(due, 1.0, 100.0)
    assert snaps.due(2.0) == set()
    replaying.consumed = 9
    assert snaps.due(3.0) == {("pumps", 3)}


def _build(served: ServedStream) -> StreamScorer:
    return build_scorer(served.spec(), served.model.checkpoint)


def _pumps_registry(tmp_path: Path, *, challenger: bool = False) -> tuple[ModelRegistry, Stream, list[str], str, str]:
    """A real (SQLite) registry with two versions of the bundled sensor model (v2: half the threshold), v1 the
    champion, and the stream "pumps" served from its champion alias (and challenger alias, if asked)."""
    db = Database(f"sqlite:///{tmp_path / 'registry.db'}")
    db.create_schema()
    registry = ModelRegistry(SqlRegistryStore(db))
    channels = json.loads(BUNDLED.with_suffix(".card.json").read_text())["feature_names"]
    v1 = registry.register(BUNDLED, "pumps")
    blob = load_blob(BUNDLED)
    blob["threshold"] *= 0.5
    torch.save(blob, tmp_path / "v2.pt")
    v2 = registry.register(tmp_path / "v2.pt", "pumps")
    registry.promote(v1, "pumps", expected_channels=channels)
    text = "".join(f'[[streams.channels]]\nname = "{c}"\n' for c in channels)
    shadow = 'challenger = "pumps@challenger"\n' if challenger else ""
    stream = parse_streams(
        '[[streams]]\nname = "pumps"\ntopic = "p"\nkind = "sensors"\nentity_key = "device_id"\n'
        f'time_field = "timestamp"\nmodel = "pumps@champion"\n{shadow}{text}'
    ).streams[0]
    return registry, stream, channels, v1, v2


def test_the_watcher_asks_once_per_interval_and_reports_entities_resumed_from_another_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real (SQLite) registry: a promote is seen at the first poll after the interval, not before; entities
    that came back from the old model's snapshots are reported as one line per stream and poll."""
    caplog.set_level(logging.INFO, logger="pipeline.processing.swap")
    registry, stream, channels, v1, v2 = _pumps_registry(tmp_path)

    serving = _build(ServedStream(stream, resolve_model(stream, registry)))
    watcher = ModelWatcher(registry, {"p": stream}, _build, poll_s=5.0)
    assert watcher.poll({"p": serving}, 100.0) == Swaps()
    registry.promote(v2, "pumps", expected_channels=channels)
    assert watcher.poll({"p": serving}, 104.9) == Swaps(), "asked again before the interval"
    new = watcher.poll({"p": serving}, 105.0).champions["p"]
    assert new.model_version == v2 and new.threshold is not None
    old_state = serving.store.snapshot(serving.store.resolve(["pump-9"]))[0]
    new.store.admit({"pump-9": old_state})
    assert watcher.poll({"p": new}, 110.0) == Swaps()
    lines = [r.getMessage() for r in caplog.records if "resumed from snapshots of another model" in r.getMessage()]
    assert lines == [
        f"stream 'pumps': 1 entities resumed from snapshots of another model ({v2} kept what carries over)"
    ]


def test_the_watcher_follows_a_challenger_alias_while_running(tmp_path: Path) -> None:
    """A challenger promoted while running starts shadow scoring at the next poll; promoted to champion (the
    registry clears its challenger alias) it stops."""
    registry, stream, channels, _, v2 = _pumps_registry(tmp_path, challenger=True)
    champion = _build(ServedStream(stream, resolve_model(stream, registry)))
    watcher = ModelWatcher(registry, {"p": stream}, _build, poll_s=1.0)
    assert watcher.poll({"p": champion}, 0.0, {}) == Swaps(), "no challenger promoted: nothing to shadow"
    registry.promote(v2, "pumps", alias="challenger", expected_channels=channels)
    challenger = watcher.poll({"p": champion}, 1.0, {}).challengers["p"]
    assert challenger is not None and challenger.model_version == v2
    assert watcher.poll({"p": champion}, 2.0, {"p": challenger}) == Swaps(), "unchanged alias: same challenger"
    registry.promote(v2, "pumps", expected_channels=channels)  # the challenger becomes the champion
    swaps = watcher.poll({"p": champion}, 3.0, {"p": challenger})
    assert swaps.champions["p"].model_version == v2
    assert swaps.challengers == {"p": None}, "promoted to champion: no longer shadowed"


def _normal_readings(devices: int, readings: int, seed: int) -> list[dict[str, Any]]:
    recs, _ = simulate_sensors(devices, readings, seed=seed, spike_devices=0, drift_devices=0)
    return strip_labels(recs)


def _alerts(scorer: StreamScorer, recs: list[dict[str, Any]]) -> list[int]:
    """Indices of the readings the scorer alerts on, fed one at a time."""
    spec = scorer.spec
    return [i for i, r in enumerate(recs) if scorer.process(spec.columns([spec.parse(r)])).is_anomaly[0]]


def test_a_promoted_version_with_another_score_scale_raises_no_more_alerts_than_it_does_alone(
    tmp_path: Path,
) -> None:
    """The fault a probe found: a hot promote to a version whose scores run on another scale (here the same
    network with an error model and threshold 9x tighter, consistently calibrated, and served with no floor at
    its global threshold, as a trained forecaster's card asks) raised false alerts on
    normal readings that neither version raised alone, because the entities' score statistics (the old
    version's) judged the new scores. On the same normal readings the new version taking over warm entities
    alerts about as often as it does serving them from their first reading."""
    registry, stream, _, v1, _ = _pumps_registry(tmp_path)
    blob = load_blob(BUNDLED)
    blob["error_precision"] = blob["error_precision"] * 9.0
    blob["threshold"] *= 9.0
    # served as `pipeline train` serves a forecaster: no floor at the global threshold (its card's knobs)
    knobs = {"z": 2.5, "smoothing": 0.3, "floor_ratio": 0.0}
    blob["card"] = {**blob["card"], "threshold": blob["threshold"], "threshold_knobs": knobs}
    torch.save(blob, tmp_path / "tight.pt")
    v3 = registry.register(tmp_path / "tight.pt", "pumps")
    recs = _normal_readings(6, 140, seed=21)
    before, after = recs[: 6 * 80], recs[6 * 80 :]
    old = _build(ServedStream(stream, resolve_model(stream, registry, v1)))
    _alerts(old, before)
    taking_over = _build(ServedStream(stream, resolve_model(stream, registry, v3)))
    taking_over.store.adopt(old.store)
    alone = _build(ServedStream(stream, resolve_model(stream, registry, v3)))  # serving the same readings
    assert _alerts(alone, before) == []
    assert isinstance(taking_over.threshold, AdaptiveThreshold) and taking_over.threshold.knobs.floor_ratio == 0.0
    # re-learning the score statistics costs what any entity's early life costs (noisy statistics from a few
    # scores: at most 1 % of the readings more here); with the old version's statistics it was 203 of 360
    assert len(_alerts(taking_over, after)) <= len(_alerts(alone, after)) + len(after) // 100
