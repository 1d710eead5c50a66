"""Contracts of the stateful forecasting family (models.lstm_forecast) served by StreamScorer: batched ==
one-at-a-time, snapshot/restore of (h, c) gives the same scores, save/load round-trips (weights_only),
seeded determinism, no NaN on absurd input, and injected faults outscore normal readings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.lstm_forecast import (
    FAMILY,
    ForecastCheckpoint,
    ForecastConfig,
    ForecastTrainConfig,
    load_forecaster,
    load_model,
    save_forecaster,
)
from pipeline.config import Settings
from pipeline.errors import StateError
from pipeline.features.streams import EventColumns, SensorStream
from pipeline.replay.core import resolve_model
from pipeline.scoring.scorer import ScoreBatch, StreamScorer
from pipeline.simulate import SENSOR_CHANNELS, simulate_sensors, strip_labels
from pipeline.training import train_stream_forecaster, train_stream_model

SMALL = ForecastTrainConfig(epochs=2, seed=3, tbptt=16, segment=64, batch_size=8)


def _cols(spec: SensorStream, records: list[dict]) -> EventColumns:
    return spec.columns([spec.parse(r) for r in strip_labels(records)])


def _slice(cols: EventColumns, a: int, b: int) -> EventColumns:
    return EventColumns(cols.entity_ids[a:b], cols.ts[a:b], cols.base[a:b])


@pytest.fixture(scope="module")
def model() -> tuple[SensorStream, ForecastCheckpoint]:
    spec = SensorStream(SENSOR_CHANNELS)
    recs, _ = simulate_sensors(6, 150, seed=2)
    cfg = ForecastConfig(n_features=8, hidden_size=16, num_layers=2)
    return spec, train_stream_forecaster(spec, _cols(spec, recs), model=cfg, train=SMALL, min_history=4)


def test_card_names_the_family(model: tuple[SensorStream, ForecastCheckpoint]) -> None:
    _, ckpt = model
    assert ckpt.card["family"] == FAMILY and ckpt.threshold > 0 and ckpt.state_size == 32


def test_batched_scoring_equals_one_at_a_time(model: tuple[SensorStream, ForecastCheckpoint]) -> None:
    spec, ckpt = model
    recs, _ = simulate_sensors(5, 60, seed=9, spike_devices=1, anomaly_len=10)
    cols = _cols(spec, recs)
    batched = StreamScorer(spec, ckpt, min_history=4).process(cols)
    single = StreamScorer(spec, ckpt, min_history=4)
    one = [single.process(_slice(cols, i, i + 1)) for i in range(len(cols.ts))]
    np.testing.assert_allclose(batched.scores, np.concatenate([o.scores for o in one]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batched.thresholds, np.concatenate([o.thresholds for o in one]), rtol=1e-5)
    assert batched.is_anomaly.tolist() == np.concatenate([o.is_anomaly for o in one]).tolist()
    chunked = StreamScorer(spec, ckpt, min_history=4)
    bounds = [0, 7, 8, 50, 51, len(cols.ts)]
    parts = [chunked.process(_slice(cols, a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
    np.testing.assert_allclose(batched.scores, np.concatenate([p.scores for p in parts]), rtol=1e-4, atol=1e-5)


def test_snapshot_restore_round_trip_gives_same_scores(model: tuple[SensorStream, ForecastCheckpoint]) -> None:
    """A worker killed after a snapshot resumes from the blobs: same (h, c), same scores afterwards."""
    spec, ckpt = model
    recs, _ = simulate_sensors(4, 80, seed=13, spike_devices=1, anomaly_len=8)
    cols = _cols(spec, recs)
    cut = len(cols.ts) // 2
    first, rest = _slice(cols, 0, cut), _slice(cols, cut, len(cols.ts))
    live = StreamScorer(spec, ckpt, min_history=4)
    live.process(first)
    slots = live.store.live_slots()
    blobs = dict(zip(live.store.entity_ids(slots), live.store.snapshot(slots), strict=True))
    assert all(len(b) == live.store.layout.blob_size for b in blobs.values())
    expected = live.process(rest)
    resumed = StreamScorer(spec, ckpt, min_history=4)
    resumed.store.admit(blobs)
    got = resumed.process(rest)
    np.testing.assert_array_equal(expected.scores, got.scores)
    np.testing.assert_array_equal(expected.is_anomaly, got.is_anomaly)
    # a fresh scorer (state lost) scores differently: the state really carries information
    fresh = StreamScorer(spec, ckpt, min_history=4).process(rest)
    assert not np.allclose(fresh.scores, expected.scores)


def test_autoencoder_state_loads_into_a_stateful_layout_without_its_window(
    model: tuple[SensorStream, ForecastCheckpoint],
) -> None:
    """A record of another model (a promoted version took over): its statistics carry over, the stateful model
    starts its (h, c) fresh and refills (count 0: min_history events before any alert)."""
    spec, ckpt = model
    recs, _ = simulate_sensors(1, 10, seed=1)
    cols = _cols(spec, recs)
    ae = StreamScorer(spec, None, prior=(np.zeros(8), np.ones(8)), window=1)
    ae.prepare(cols)
    live = ae.store.live_slots()
    blobs = dict(zip(ae.store.entity_ids(live), ae.store.snapshot(live), strict=True))
    stateful = StreamScorer(spec, ckpt).store
    stateful.admit(blobs)
    s = stateful.resolve(list(blobs))
    np.testing.assert_array_equal(stateful.feat_mean[s], ae.store.feat_mean[live])
    assert (stateful.count[s] == 0).all() and (stateful.rnn_h[s] == 0).all() and np.isnan(stateful.rnn_pred[s]).all()
    with pytest.raises(StateError):
        stateful.admit({"other": b"\x03\x00 no state record"})


def test_save_load_round_trip_weights_only(model: tuple[SensorStream, ForecastCheckpoint], tmp_path: Path) -> None:
    spec, ckpt = model
    path = save_forecaster(ckpt, tmp_path / "sensors.pt")
    assert torch.load(path, weights_only=True)["family"] == FAMILY
    assert path.with_suffix(".card.json").exists()
    loaded = load_forecaster(path)
    assert isinstance(load_model(path), ForecastCheckpoint)
    assert isinstance(resolve_model(str(path), Settings()), ForecastCheckpoint)  # `pipeline replay --model FILE`
    assert loaded.version == ckpt.version and loaded.threshold == ckpt.threshold
    recs, _ = simulate_sensors(3, 40, seed=5)
    cols = _cols(spec, recs)
    np.testing.assert_array_equal(
        StreamScorer(spec, ckpt).process(cols).scores, StreamScorer(spec, loaded).process(cols).scores
    )


def test_load_model_still_loads_autoencoders(tmp_path: Path) -> None:
    from models.lstm_ae import Checkpoint, LSTMAEConfig, TrainConfig, save_checkpoint

    spec = SensorStream(SENSOR_CHANNELS)
    recs, _ = simulate_sensors(2, 40, seed=2)
    ae = train_stream_model(
        spec,
        _cols(spec, recs),
        model=LSTMAEConfig(n_features=8, window=4, hidden_size=4, latent_size=2),
        train=TrainConfig(epochs=1),
        min_history=2,
    )
    assert isinstance(load_model(save_checkpoint(ae, tmp_path / "ae.pt")), Checkpoint)


def test_training_is_deterministic_for_a_seed() -> None:
    spec = SensorStream(SENSOR_CHANNELS)
    recs, _ = simulate_sensors(3, 80, seed=2)
    cols = _cols(spec, recs)
    cfg = ForecastConfig(n_features=8, hidden_size=8)
    a = train_stream_forecaster(spec, cols, model=cfg, train=SMALL, min_history=2)
    b = train_stream_forecaster(spec, cols, model=cfg, train=SMALL, min_history=2)
    assert a.version == b.version and a.threshold == b.threshold
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and np.array_equal(va.numpy(), vb.numpy())


def test_no_nan_on_extreme_inputs(model: tuple[SensorStream, ForecastCheckpoint]) -> None:
    spec, ckpt = model
    scorer = StreamScorer(spec, ckpt, min_history=1)
    base = np.array([[0.0] * 8, [1e300] * 8, [-1e300] * 8, [0.0] * 8, [1e-300] * 8], dtype=np.float64)
    cols = EventColumns(["d1", "d1", "d1", "d2", "d3"], np.array([1.0, 2.0, 3.0, 1.0, 1.0]), base)
    res = scorer.process(cols)
    assert np.isfinite(res.scores).all() and np.isfinite(res.thresholds).all()
    assert np.array_equal(res.observed, base)  # the alert shows what was sent (it showed 1e30, the model's clip)
    assert np.isfinite(res.reconstructed).all()
    assert res.is_anomaly[1:3].all()  # absurd values are anomalies, not NaN
    assert np.isfinite(scorer.store.rnn_h).all() and np.isfinite(scorer.store.rnn_c).all()


def test_injected_spikes_outscore_normal_readings(model: tuple[SensorStream, ForecastCheckpoint]) -> None:
    spec, ckpt = model
    recs, _ = simulate_sensors(4, 120, seed=31, spike_devices=2, anomaly_len=6)
    res = StreamScorer(spec, ckpt, min_history=4).process(_cols(spec, recs))
    labels = np.array([r["label"] for r in recs], bool)
    assert np.median(res.scores[labels]) > np.quantile(res.scores[~labels], 0.9)


def test_a_gap_restarts_the_sequence_context_and_keeps_the_statistics(
    model: tuple[SensorStream, ForecastCheckpoint],
) -> None:
    """context_gap_s: after a gap an entity's (h, c), prediction and window start again (no alert for
    min_history events, first event unscored as for a new entity) while its scaling and score statistics stay;
    the same as restarting the context by hand at the gap, batched or not."""
    spec, ckpt = model
    recs, _ = simulate_sensors(3, 60, seed=21)
    cols = _cols(spec, recs)
    late = EventColumns(cols.entity_ids, cols.ts + 10_000.0, cols.base)  # the same readings, much later
    auto = StreamScorer(spec, ckpt, min_history=4, context_gap_s=1_000.0)
    auto.process(cols)
    s = auto.store.resolve(sorted(set(cols.entity_ids)))
    before = {k: getattr(auto.store, k)[s].copy() for k in ("feat_mean", "feat_m2", "score_n", "score_mean")}
    after = auto.process(late)
    by_hand = StreamScorer(spec, ckpt, min_history=4)
    by_hand.process(cols)
    by_hand.restart_context(sorted(set(cols.entity_ids)))
    for k, v in before.items():  # the restart keeps scaling and score statistics as they were
        np.testing.assert_array_equal(getattr(by_hand.store, k)[s], v)
    assert (by_hand.store.count[s] == 0).all() and np.isnan(by_hand.store.rnn_pred[s]).all()
    assert not by_hand.store.rnn_h[s].any()
    expected = by_hand.process(late)
    np.testing.assert_allclose(after.scores, expected.scores, rtol=1e-5, atol=1e-6)
    ids = np.asarray(late.entity_ids)
    for e in set(late.entity_ids):
        first = np.flatnonzero(ids == e)
        assert after.raw_scores[first[0]] == 0.0  # no prediction yet: a fresh context
        assert not after.is_anomaly[first[:3]].any()  # refilling: min_history events without alerts
    assert np.isfinite(after.scores).all()
    never = StreamScorer(spec, ckpt, min_history=4)  # without the knob the gap changes nothing
    never.process(cols)
    assert never.process(late).raw_scores[np.flatnonzero(ids == ids[0])[0]] > 0.0


def test_the_service_judges_an_entity_only_after_the_models_burn_in(
    model: tuple[SensorStream, ForecastCheckpoint],
) -> None:
    """Training left errors before burn_in out of the threshold, so the served scorer waits for them too
    (never for less than the min_history knob); an autoencoder keeps the knob."""
    from dataclasses import replace

    from pipeline.scoring.factory import build_scorer
    from pipeline.scoring.knobs import ThresholdKnobs

    spec, ckpt = model
    assert ckpt.burn_in == SMALL.burn_in == 16
    assert build_scorer(spec, ckpt, knobs=ThresholdKnobs(min_history=8)).min_history == 16
    assert build_scorer(spec, ckpt, knobs=ThresholdKnobs(min_history=40)).min_history == 40
    older = replace(ckpt, card={k: v for k, v in ckpt.card.items() if k != "training"})
    assert older.burn_in == ForecastTrainConfig.burn_in  # a card without it: the training default
    recs, _ = simulate_sensors(4, 16, seed=21, spike_devices=4, anomaly_len=8)  # faults in readings 8-15
    cols = _cols(spec, recs)
    knob_only = StreamScorer(spec, ckpt, min_history=4).process(cols)
    served = build_scorer(spec, ckpt, knobs=ThresholdKnobs(min_history=4)).process(_cols(spec, recs))
    np.testing.assert_allclose(served.scores, knob_only.scores, rtol=1e-6)
    assert knob_only.is_anomaly.any() and not served.is_anomaly.any()


def test_a_young_entity_is_judged_by_the_early_life_threshold_of_the_card(
    model: tuple[SensorStream, ForecastCheckpoint],
) -> None:
    """Training calibrates a second threshold on every entity's early life (burn_in .. burn_in + young_steps),
    where errors run higher while the entity's scaling settles; the service judges entities by it until they
    are warm. Never below the settled threshold; a card without it falls back to that."""
    from dataclasses import replace

    from pipeline.scoring.factory import build_scorer
    from pipeline.scoring.knobs import ThresholdKnobs

    spec, ckpt = model
    assert ckpt.card["young_threshold"] >= ckpt.threshold
    assert ckpt.young_threshold == ckpt.card["young_threshold"]
    served = build_scorer(spec, ckpt, knobs=ThresholdKnobs())
    assert served.threshold.young_threshold == ckpt.young_threshold  # type: ignore[union-attr]
    older = replace(ckpt, card={k: v for k, v in ckpt.card.items() if k != "young_threshold"})
    assert older.young_threshold == ckpt.threshold
    below = replace(ckpt, card={**ckpt.card, "young_threshold": ckpt.threshold / 2})
    assert below.young_threshold == ckpt.threshold


def test_a_restarted_context_is_judged_by_the_cold_threshold_during_the_burn_in(
    model: tuple[SensorStream, ForecastCheckpoint],
) -> None:
    """A probe: after a promote (or rollback) every entity's (h, c) starts again and went unjudged for the
    burn-in, so spikes of vibration 40 raised no alert for 15 readings. An entity whose scaling is established
    is now judged during the burn-in by the card's cold threshold (calibrated on fresh-state errors): a gross
    fault alerts, normal readings do not. A brand-new entity, and a card without it, wait as before."""
    from dataclasses import replace

    spec, ckpt = model
    cold = ckpt.cold_threshold
    assert cold is not None and cold == ckpt.card["cold_threshold"] >= ckpt.young_threshold
    recs, _ = simulate_sensors(3, 80, seed=31)
    cols = _cols(spec, recs)
    ids = np.asarray(cols.entity_ids)
    e0 = ids[0]
    rows = np.flatnonzero(ids == e0)
    history, after = _slice(cols, 0, rows[59] + 1), cols.base[rows[60:70]].copy()
    after[4] *= 50.0  # a gross fault on the 5th reading after the restart
    gap = EventColumns([e0] * 10, cols.ts[rows[60:70]], after)

    def served(card: dict) -> tuple[StreamScorer, ScoreBatch]:
        scorer = StreamScorer(spec, replace(ckpt, card=card), min_history=16)
        scorer.process(history)
        scorer.restart_context([e0])  # what a swap or a context gap leaves: fresh (h, c), scaling kept
        return scorer, scorer.process(gap)

    _, res = served(ckpt.card)
    assert res.is_anomaly[4] and not res.is_anomaly[:4].any()
    assert res.thresholds[1] == cold and res.scores[4] == res.raw_scores[4] > cold
    _, older = served({k: v for k, v in ckpt.card.items() if k != "cold_threshold"})
    assert not older.is_anomaly.any()  # a card without it: the burn-in is not judged
    fresh = StreamScorer(spec, ckpt, min_history=16).process(EventColumns(["new"] * 10, gap.ts, after))
    assert not fresh.is_anomaly.any()  # a brand-new entity's scaling is the prior's: it waits


def test_a_promoted_forecaster_judges_the_entities_it_takes_over_from_their_first_readings(
    model: tuple[SensorStream, ForecastCheckpoint],
) -> None:
    """The swap path itself (EntityStateStore.adopt, as pipeline.processing.swap does at a checkpoint
    boundary): the new version keeps the entities' scaling, starts their (h, c) afresh, and alerts on a gross
    fault in its burn-in."""
    from dataclasses import replace

    spec, ckpt = model
    recs, _ = simulate_sensors(3, 80, seed=32)
    cols = _cols(spec, recs)
    ids = np.asarray(cols.entity_ids)
    rows = np.flatnonzero(ids == ids[0])
    old = StreamScorer(spec, replace(ckpt, card={**ckpt.card, "version": "pumps-v1"}), min_history=16)
    old.process(_slice(cols, 0, rows[59] + 1))
    new = StreamScorer(spec, replace(ckpt, card={**ckpt.card, "version": "pumps-v2"}), min_history=16)
    carry = new.store.adopt(old.store)
    assert not carry.same_model and carry.stats  # scaling kept, (h, c) re-warms
    after = cols.base[rows[60:70]].copy()
    after[3] *= 50.0
    res = new.process(EventColumns([ids[0]] * 10, cols.ts[rows[60:70]], after))
    assert res.is_anomaly[3] and not res.is_anomaly[:3].any() and res.thresholds[3] == ckpt.cold_threshold
