"""Scorer contracts (as river/timm test theirs): batched == one-at-a-time, save/load round-trips,
seeded determinism, no NaN even on absurd inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.lstm_ae import (
    Checkpoint,
    LSTMAEConfig,
    TrainConfig,
    bundled_checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.features.streams import EventColumns, SensorStream, TransactionStream
from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.scoring.scorer import StreamScorer
from pipeline.scoring.threshold import AdaptiveThreshold
from pipeline.simulate import SENSOR_CHANNELS, simulate_sensors, simulate_transactions, strip_labels
from pipeline.training import train_stream_model

SMALL = TrainConfig(epochs=2, seed=3)


def _cols(spec: object, records: list[dict]) -> EventColumns:
    return spec.columns([spec.parse(r) for r in strip_labels(records)])  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def sensor_model() -> tuple[SensorStream, Checkpoint]:
    spec = SensorStream(SENSOR_CHANNELS)
    recs, _ = simulate_sensors(6, 150, seed=2)
    cfg = LSTMAEConfig(n_features=8, window=16, hidden_size=16, latent_size=4)
    return spec, train_stream_model(spec, _cols(spec, recs), model=cfg, train=SMALL, min_history=4)


@pytest.fixture(scope="module")
def tx_model() -> tuple[TransactionStream, Checkpoint]:
    spec = TransactionStream()
    recs, _ = simulate_transactions(60, 30, seed=4)
    cfg = LSTMAEConfig(n_features=spec.n_features, window=8, hidden_size=16, latent_size=4)
    return spec, train_stream_model(spec, _cols(spec, recs), model=cfg, train=SMALL, min_history=4)


def _slice(cols: EventColumns, a: int, b: int) -> EventColumns:
    return EventColumns(cols.entity_ids[a:b], cols.ts[a:b], cols.base[a:b])


@pytest.fixture(scope="module")
def tx_onesided_model() -> tuple[TransactionStream, Checkpoint]:
    """One-sided amount errors and a globally scaled amount (the transactions benchmark's knobs)."""
    spec = TransactionStream()
    recs, _ = simulate_transactions(60, 30, seed=4)
    cfg = LSTMAEConfig(
        n_features=spec.n_features,
        window=8,
        hidden_size=16,
        latent_size=4,
        score_steps=2,
        upper_features=(0,),
        global_features=(0,),
    )
    return spec, train_stream_model(spec, _cols(spec, recs), model=cfg, train=SMALL, min_history=4)


@pytest.mark.parametrize("which", ["sensor_model", "tx_model", "tx_onesided_model"])
def test_batched_scoring_equals_one_at_a_time(which: str, request: pytest.FixtureRequest) -> None:
    spec, ckpt = request.getfixturevalue(which)
    if which == "sensor_model":
        recs, _ = simulate_sensors(5, 60, seed=9, spike_devices=1, anomaly_len=10)
    else:
        recs, _ = simulate_transactions(30, 20, seed=9, burst_customers=2)
    cols = _cols(spec, recs)
    batched = StreamScorer(spec, ckpt, min_history=4).process(cols)
    single = StreamScorer(spec, ckpt, min_history=4)
    one = [single.process(_slice(cols, i, i + 1)) for i in range(len(cols.ts))]
    np.testing.assert_allclose(batched.scores, np.concatenate([o.scores for o in one]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched.thresholds, np.concatenate([o.thresholds for o in one]), rtol=1e-5)
    assert batched.is_anomaly.tolist() == np.concatenate([o.is_anomaly for o in one]).tolist()
    # uneven micro-batches too
    chunked = StreamScorer(spec, ckpt, min_history=4)
    bounds = [0, 7, 8, 50, 51, len(cols.ts)]
    parts = [chunked.process(_slice(cols, a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
    np.testing.assert_allclose(batched.scores, np.concatenate([p.scores for p in parts]), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_gives_same_scores(sensor_model: tuple[SensorStream, Checkpoint], tmp_path: Path) -> None:
    spec, ckpt = sensor_model
    path = save_checkpoint(ckpt, tmp_path / "sensors.pt")
    assert path.with_suffix(".card.json").exists()
    loaded = load_checkpoint(path)
    assert loaded.version == ckpt.version and loaded.threshold == ckpt.threshold
    recs, _ = simulate_sensors(3, 40, seed=5)
    cols = _cols(spec, recs)
    a = StreamScorer(spec, ckpt).process(cols).scores
    b = StreamScorer(spec, loaded).process(cols).scores
    np.testing.assert_array_equal(a, b)
    assert torch.load(path, weights_only=True)["format"] == 1  # tensors and plain data: no pickled code runs


@pytest.mark.parametrize("stream", ["sensors", "transactions"])
def test_bundled_checkpoints_load_without_unpickling_code(stream: str) -> None:
    """The shipped files predate the plain-str torch_version; they load with weights_only=True all the same."""
    ckpt = load_checkpoint(bundled_checkpoint_path(stream))
    assert ckpt.card["torch_version"] and ckpt.threshold > 0


def test_training_is_deterministic_for_a_seed() -> None:
    spec = SensorStream(SENSOR_CHANNELS)
    recs, _ = simulate_sensors(3, 80, seed=2)
    cols = _cols(spec, recs)
    cfg = LSTMAEConfig(n_features=8, window=8, hidden_size=8, latent_size=4)
    a = train_stream_model(spec, cols, model=cfg, train=TrainConfig(epochs=1, seed=7), min_history=2)
    b = train_stream_model(spec, cols, model=cfg, train=TrainConfig(epochs=1, seed=7), min_history=2)
    assert a.version == b.version and a.threshold == b.threshold
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb
        assert np.array_equal(va.numpy(), vb.numpy())


def test_no_nan_on_extreme_inputs(sensor_model: tuple[SensorStream, Checkpoint]) -> None:
    spec, ckpt = sensor_model
    scorer = StreamScorer(spec, ckpt, min_history=1)
    base = np.array([[1e300] * 8, [-1e300] * 8, [0.0] * 8, [1e-300] * 8], dtype=np.float64)
    cols = EventColumns(["d1", "d1", "d2", "d3"], np.array([1.0, 2.0, 1.0, 1.0]), base)
    res = scorer.process(cols)
    assert np.isfinite(res.scores).all() and np.isfinite(res.thresholds).all()
    assert np.array_equal(res.observed, base)  # the alert shows what was sent (it showed 1e30, the model's clip)
    assert res.is_anomaly[:2].all()  # absurd values are anomalies, not NaN


def test_injected_anomalies_outscore_normal_traffic(tx_model: tuple[TransactionStream, Checkpoint]) -> None:
    spec, ckpt = tx_model
    recs, inj = simulate_transactions(40, 30, seed=12, burst_customers=2, burst_len=3)
    res = StreamScorer(spec, ckpt, min_history=4).process(_cols(spec, recs))
    labels = np.array([r["label"] for r in recs], bool)
    assert res.scores[labels].min() > np.quantile(res.scores[~labels], 0.95)


def test_smoothed_scoring_batched_equals_one_at_a_time(sensor_model: tuple[SensorStream, Checkpoint]) -> None:
    """The EWMA of log-scores lives in entity state, so micro-batching cannot change it."""
    spec, ckpt = sensor_model
    recs, _ = simulate_sensors(4, 50, seed=19, spike_devices=1, anomaly_len=12)
    cols = _cols(spec, recs)

    def scorer() -> StreamScorer:
        return StreamScorer(
            spec,
            ckpt,
            min_history=4,
            threshold=AdaptiveThreshold(ckpt.threshold, ThresholdKnobs(warmup=5, smoothing=0.2)),
        )

    batched = scorer().process(cols)
    single = scorer()
    young = np.zeros(len(cols.ts), bool)  # the entity had fewer than `warmup` normal scores before the event
    one = []
    for i in range(len(cols.ts)):
        known = cols.entity_ids[i] in single.store
        slot = single.store.resolve([cols.entity_ids[i]])[0] if known else None
        young[i] = slot is None or single.store.score_n[slot] < 5
        one.append(single.process(_slice(cols, i, i + 1)))
    np.testing.assert_allclose(batched.scores, np.concatenate([o.scores for o in one]), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(batched.raw_scores, np.concatenate([o.raw_scores for o in one]), rtol=1e-5, atol=1e-6)
    assert batched.is_anomaly.tolist() == np.concatenate([o.is_anomaly for o in one]).tolist()
    # a warm entity's score is the EWMA (alpha 0.2) of its log1p raw scores; a young one is judged by its raw
    # score (the model's threshold was calibrated on raw scores), while the average keeps running
    ent = np.asarray(cols.entity_ids) == cols.entity_ids[0]
    x = np.log1p(batched.raw_scores[ent])
    ema = [x[0]]
    for v in x[1:]:
        ema.append(0.2 * v + 0.8 * ema[-1])
    warm = ~young[ent]
    assert warm.any() and (~warm).any()
    np.testing.assert_allclose(batched.scores[ent][warm], np.expm1(ema)[warm], rtol=1e-9)
    np.testing.assert_allclose(batched.scores[ent][~warm], batched.raw_scores[ent][~warm], rtol=1e-9)


def test_hysteresis_batched_equals_one_at_a_time(sensor_model: tuple[SensorStream, Checkpoint]) -> None:
    """The alert state lives in entity state, so micro-batching cannot change which events alert."""
    spec, ckpt = sensor_model
    recs, _ = simulate_sensors(4, 60, seed=19, spike_devices=2, anomaly_len=12)
    cols = _cols(spec, recs)

    def scorer() -> StreamScorer:
        knobs = ThresholdKnobs(warmup=5, z=3.0, z_release=1.0, smoothing=0.5)
        return StreamScorer(spec, ckpt, min_history=4, threshold=AdaptiveThreshold(ckpt.threshold, knobs))

    batched = scorer().process(cols)
    single = scorer()
    one = [single.process(_slice(cols, i, i + 1)) for i in range(len(cols.ts))]
    assert batched.is_anomaly.any()
    assert batched.is_anomaly.tolist() == np.concatenate([o.is_anomaly for o in one]).tolist()
    np.testing.assert_allclose(batched.thresholds, np.concatenate([o.thresholds for o in one]), rtol=1e-6)


def test_no_smoothing_keeps_raw_scores(sensor_model: tuple[SensorStream, Checkpoint]) -> None:
    spec, ckpt = sensor_model
    recs, _ = simulate_sensors(2, 30, seed=21)
    res = StreamScorer(spec, ckpt, min_history=4).process(_cols(spec, recs))
    np.testing.assert_array_equal(res.scores, res.raw_scores)


def _with_late(cols: EventColumns, late_s: float, stale_s: float) -> tuple[EventColumns, np.ndarray, np.ndarray]:
    """The stream plus, after some events, a copy of that event `late_s` (late) or `stale_s` (out of order) behind
    it, with other values. Returns the columns, where the original events went, and each event's kind
    (0 = original, 1 = late, 2 = out of order)."""
    ids: list[str] = []
    ts: list[float] = []
    rows: list[np.ndarray] = []
    kind: list[int] = []
    orig: list[int] = []
    seen: set[str] = set()
    for i, e in enumerate(cols.entity_ids):
        orig.append(len(ids))
        ids.append(e)
        ts.append(cols.ts[i])
        rows.append(cols.base[i])
        kind.append(0)
        if e in seen and i % 5 in (1, 3):
            k = 1 if i % 5 == 1 else 2
            ids.append(e)
            ts.append(cols.ts[i] - (late_s if k == 1 else stale_s))
            rows.append(cols.base[i] * 1.5 + 0.3)
            kind.append(k)
        seen.add(e)
    return EventColumns(ids, np.asarray(ts), np.asarray(rows)), np.asarray(orig), np.asarray(kind)


def _lateness_scorer(spec: SensorStream, ckpt: Checkpoint) -> StreamScorer:
    return StreamScorer(
        spec,
        ckpt,
        min_history=4,
        allowed_lateness_s=30.0,
        threshold=AdaptiveThreshold(ckpt.threshold, ThresholdKnobs(warmup=5, smoothing=0.3)),
    )


def _mask(m: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, bool) if m is None else m


def test_lateness_batched_equals_one_at_a_time(sensor_model: tuple[SensorStream, Checkpoint]) -> None:
    spec, ckpt = sensor_model
    recs, _ = simulate_sensors(4, 50, seed=23, spike_devices=1, anomaly_len=12)
    cols, _, kind = _with_late(_cols(spec, recs), late_s=0.5, stale_s=10_000.0)
    whole = _lateness_scorer(spec, ckpt)
    batched = whole.process(cols)
    single = _lateness_scorer(spec, ckpt)
    one = [single.process(_slice(cols, i, i + 1)) for i in range(len(cols.ts))]
    n = len(cols.ts)
    assert _mask(batched.late, n).tolist() == (kind == 1).tolist()
    assert _mask(batched.rejected, n).tolist() == (kind == 2).tolist()
    assert np.concatenate([_mask(o.late, 1) for o in one]).tolist() == (kind == 1).tolist()
    assert np.concatenate([_mask(o.rejected, 1) for o in one]).tolist() == (kind == 2).tolist()
    kept = kind != 2
    np.testing.assert_allclose(
        batched.scores[kept], np.concatenate([o.scores for o in one])[kept], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(batched.thresholds[kept], np.concatenate([o.thresholds for o in one])[kept], rtol=1e-5)
    assert batched.is_anomaly.tolist() == np.concatenate([o.is_anomaly for o in one]).tolist()
    assert not batched.is_anomaly[kind == 2].any()
    ids = sorted(set(cols.entity_ids))
    sa, sb = whole.store.resolve(ids), single.store.resolve(ids)
    for name in ("count", "last_ts", "feat_n", "score_n"):  # exact: late events left them alone in both
        assert getattr(whole.store, name)[sa].tolist() == getattr(single.store, name)[sb].tolist(), name
    np.testing.assert_array_equal(whole.store.windows(sa), single.store.windows(sb))
    for name in ("feat_mean", "score_mean", "score_ema"):  # model outputs: batched vs single float noise
        np.testing.assert_allclose(getattr(whole.store, name)[sa], getattr(single.store, name)[sb], rtol=1e-5)


def test_late_and_out_of_order_events_leave_entity_state_untouched(
    sensor_model: tuple[SensorStream, Checkpoint],
) -> None:
    """An entity's state after a stream with late and out-of-order events equals its state after the stream
    without them, and the in-order events score the same: only the late ones were added (scored)."""
    spec, ckpt = sensor_model
    recs, _ = simulate_sensors(4, 50, seed=24, spike_devices=1, anomaly_len=12)
    plain = _cols(spec, recs)
    mixed, orig, kind = _with_late(plain, late_s=0.5, stale_s=10_000.0)
    assert (kind == 1).sum() >= 10 and (kind == 2).sum() >= 10
    a, b = _lateness_scorer(spec, ckpt), _lateness_scorer(spec, ckpt)
    ra, rb = a.process(plain), b.process(mixed)
    np.testing.assert_allclose(rb.scores[orig], ra.scores, rtol=1e-6, atol=1e-9)
    assert rb.is_anomaly[orig].tolist() == ra.is_anomaly.tolist()
    assert np.isfinite(rb.scores[kind == 1]).all()
    ids = sorted(set(plain.entity_ids))
    assert a.store.snapshot(a.store.resolve(ids)) == b.store.snapshot(b.store.resolve(ids))
    # without a policy (offline evaluation) every event is the entity's next step, as before
    c = StreamScorer(spec, ckpt, min_history=4)
    rc = c.process(mixed)
    assert rc.late is None and rc.rejected is None
    assert c.store.snapshot(c.store.resolve(ids)) != a.store.snapshot(a.store.resolve(ids))


def test_savepoint_undoes_a_failed_batch(
    sensor_model: tuple[SensorStream, Checkpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that raises after its events were applied, undone by the savepoint taken before it, leaves the
    entities' state as before, so retrying (the service retries halves to isolate a poison record) never
    applies an event twice."""
    spec, ckpt = sensor_model
    recs, _ = simulate_sensors(4, 40, seed=25, spike_devices=1, anomaly_len=10)
    cols = _cols(spec, recs)
    first, second = _slice(cols, 0, 90), _slice(cols, 90, len(cols.ts))
    clean, flaky = _lateness_scorer(spec, ckpt), _lateness_scorer(spec, ckpt)
    clean.process(first)
    flaky.process(first)
    ids = sorted(set(cols.entity_ids) | {"new-device"})
    second = EventColumns(
        [*second.entity_ids, "new-device"], np.r_[second.ts, second.ts[-1]], np.r_[second.base, second.base[-1:]]
    )
    before = flaky.store.snapshot(flaky.store.resolve(ids))

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("model failed after the batch was applied")

    monkeypatch.setattr(flaky.checkpoint, "score", boom)
    undo = flaky.savepoint(second.entity_ids)
    with pytest.raises(RuntimeError):
        flaky.process(second)
    undo()
    assert flaky.store.snapshot(flaky.store.resolve(ids)) == before
    monkeypatch.undo()
    want = clean.process(second)
    got = flaky.process(second)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert flaky.store.snapshot(flaky.store.resolve(ids)) == clean.store.snapshot(clean.store.resolve(ids))
