"""Knobs added for evaluation: frozen learning, scored feature subsets, terminal context."""

from __future__ import annotations

import numpy as np
import pytest

from models.lstm_ae import LSTMAEConfig, TrainConfig, load_checkpoint, save_checkpoint, train_autoencoder
from pipeline.features.streams import EventColumns, SensorStream, TransactionStream
from pipeline.features.terminal import TerminalContext
from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.scoring.scorer import StreamScorer
from pipeline.scoring.threshold import AdaptiveThreshold


def _ckpt(n_features: int, score_features: tuple[int, ...] | None = None):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    cfg = LSTMAEConfig(n_features=n_features, window=4, hidden_size=4, latent_size=2, score_features=score_features)
    w = rng.normal(0, 1, (200, 4, n_features)).astype(np.float32)
    ck = train_autoencoder(w, cfg, TrainConfig(epochs=1), name="t", feature_names=[f"f{i}" for i in range(n_features)])
    ck.card["feature_prior"] = {"mean": [0.0] * n_features, "std": [1.0] * n_features}
    return ck


def test_score_features_subset_and_roundtrip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ck = _ckpt(3, (0, 2))
    x = np.random.default_rng(1).normal(0, 1, (5, 4, 3)).astype(np.float32)
    scores, contrib, _ = ck.score(x)
    assert np.all(contrib[:, 1] == 0)
    np.testing.assert_allclose(scores, contrib.sum(axis=1))
    loaded = load_checkpoint(save_checkpoint(ck, tmp_path / "m.pt"))
    assert loaded.config.score_features == (0, 2)
    np.testing.assert_allclose(loaded.score(x)[0], scores, rtol=1e-6)


def test_learn_false_freezes_scaling_and_score_stats() -> None:
    ck = _ckpt(2)
    spec = SensorStream(["f0", "f1"])
    scorer = StreamScorer(spec, ck, threshold=AdaptiveThreshold(ck.threshold, ThresholdKnobs(warmup=2)), min_history=1)
    rng = np.random.default_rng(2)

    def batch(n: int, t0: float) -> EventColumns:
        return EventColumns(["e"] * n, t0 + np.arange(n, dtype=float), rng.normal(0, 1, (n, 2)))

    scorer.process(batch(20, 0))
    slot = scorer.store.resolve(["e"])
    before = (scorer.store.feat_n[slot].copy(), scorer.store.feat_mean[slot].copy(), scorer.store.score_n[slot].copy())
    scorer.process(batch(20, 100), learn=False)
    assert scorer.store.count[slot][0] == 40  # windows still move
    np.testing.assert_array_equal(scorer.store.feat_n[slot], before[0])
    np.testing.assert_array_equal(scorer.store.feat_mean[slot], before[1])
    np.testing.assert_array_equal(scorer.store.score_n[slot], before[2])


def test_terminal_context_is_batch_invariant_and_causal() -> None:
    rng = np.random.default_rng(3)
    n = 300
    ts = np.sort(rng.uniform(0, 5 * 86400, n))
    terms = [f"T{int(i)}" for i in rng.integers(0, 7, n)]
    la = rng.normal(3, 1, n)
    whole = TerminalContext().features(terms, ts, la)
    ctx = TerminalContext()
    parts = np.concatenate([ctx.features(terms[s : s + 37], ts[s : s + 37], la[s : s + 37]) for s in range(0, n, 37)])
    np.testing.assert_allclose(parts, whole)
    first = terms.index(terms[0])
    assert whole[first, 0] == 0.0  # a terminal's first payment sees no history
    # two payments at one terminal a tau apart: decayed count exp(-1)
    f = TerminalContext(tau_s=10.0).features(["A", "A"], np.array([0.0, 10.0]), np.array([1.0, 1.0]))
    assert f[1, 0] == pytest.approx(np.log1p(np.exp(-1.0)))


def test_transaction_stream_terminal_context_features() -> None:
    plain, ctx = TransactionStream(), TransactionStream(terminal_context=True)
    assert plain.n_features == 6 and ctx.n_features == 8
    cols = ctx.columns_from_arrays(
        ["c1", "c2"], np.array([0.0, 60.0]), np.array([10.0, 20.0]), ["T1", "T1"], contexts={0: ctx.new_context()}
    )
    assert cols.base.shape == (2, 8)
    assert cols.base[1, 6] > 0
    with pytest.raises(ValueError):
        ctx.columns_from_arrays(["c1"], np.array([0.0]), np.array([1.0]))


def test_upper_features_count_only_high_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    two = _ckpt(2)
    one = _ckpt(2)
    one.config = LSTMAEConfig(**{**one.config.__dict__, "upper_features": (0,)})
    one.model, one.error_model = two.model, two.error_model
    x = np.random.default_rng(4).normal(0, 1, (50, 4, 2)).astype(np.float32)
    base_two, base_one = two.score(x)[0], one.score(x)[0]
    np.testing.assert_allclose(base_one, one.score(x)[0])
    lo, hi = x.copy(), x.copy()
    lo[:, -1, 0] -= 20.0  # unusually low feature 0: two-sided score jumps, one-sided does not
    hi[:, -1, 0] += 20.0
    assert np.all(two.score(lo)[0] > base_two + 10)
    assert np.all(one.score(lo)[0] <= two.score(lo)[0])
    assert np.all(one.score(lo)[0] < base_one + 10)
    np.testing.assert_allclose(one.score(hi)[0], two.score(hi)[0], rtol=0.2)
    assert np.all(one.score(hi)[0] > base_one + 10)
    loaded = load_checkpoint(save_checkpoint(one, tmp_path / "u.pt"))
    assert loaded.config.upper_features == (0,)
    np.testing.assert_allclose(loaded.score(lo)[0], one.score(lo)[0], rtol=1e-6)


def test_mask_last_hides_the_newest_scored_step_from_the_encoder() -> None:
    import torch

    from models.lstm_ae import LSTMAutoencoder

    cfg = LSTMAEConfig(n_features=3, window=4, hidden_size=4, latent_size=2, score_features=(0, 2), mask_last=True)
    model = LSTMAutoencoder(cfg).eval()
    x = torch.randn(5, 4, 3)
    y = x.clone()
    y[:, -1, [0, 2]] += 100.0  # only the masked values change
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(y))
        z = x.clone()
        z[:, -1, 1] += 100.0  # an unscored (context) feature of the last step is still read
        assert not torch.allclose(model(x), model(z))


def test_value_features_and_diagonal_error_model() -> None:
    from models.lstm_ae import ErrorModel

    e = np.random.default_rng(5).normal(0, 1, (500, 2))
    e[:, 1] = e[:, 0] + 0.1 * e[:, 1]  # strongly correlated errors
    full, diag = ErrorModel.fit(e), ErrorModel.fit(e, diagonal=True)
    assert abs(full.precision[0, 1]) > 1.0 and diag.precision[0, 1] == 0.0
    both_high = np.array([[3.0, 3.0]])
    assert diag.contributions(both_high).sum() > full.contributions(both_high).sum()  # agreeing evidence adds up
    cfg = LSTMAEConfig(n_features=2, window=4, score_features=(0, 1), value_features=(1,))
    w = np.random.default_rng(6).normal(0, 1, (3, 4, 2)).astype(np.float32)
    recon = np.zeros_like(w) + 0.5
    err = cfg.errors(w, recon)
    np.testing.assert_allclose(err[:, -1, 0], w[:, -1, 0] - 0.5, rtol=1e-6)
    np.testing.assert_allclose(err[:, -1, 1], w[:, -1, 1], rtol=1e-6)  # the value, not the error


def test_terminal_fraud_feedback_is_causal_and_decays() -> None:
    day = 86400.0
    ctx = TerminalContext(feedback_tau_s=2 * day)
    assert ctx.n_features == 3
    f0 = ctx.features(["A", "B"], np.array([0.0, 0.0]), np.array([1.0, 1.0]))
    assert f0[:, 2].tolist() == [0.0, 0.0]  # no label known yet
    # at day 7, the labels of two day-0 payments at A arrive: one fraud, one not
    ctx.add_labels([0, 1], ["A", "A"], np.array([7 * day, 7 * day]), np.array([1, 0]))
    f = ctx.features(["A", "B", "A"], np.array([7 * day, 7 * day, 9 * day]), np.array([1.0, 1.0, 1.0]))
    assert f[0, 2] == pytest.approx(1 / (2 + 1))  # one pseudo-legit label as prior
    assert f[1, 2] == 0.0  # other terminals unaffected
    d = np.exp(-1.0)  # two days later, at tau = 2 days
    assert f[2, 2] == pytest.approx(d / (2 * d + 1))
    with pytest.raises(ValueError):
        TerminalContext().add_labels([0], ["A"], np.array([0.0]), np.array([1]))


def test_transaction_stream_with_feedback_has_the_risk_feature() -> None:
    spec = TransactionStream(terminal_context=True, fraud_feedback_tau_s=86400.0)
    assert spec.feature_names[-1] == "terminal_fraud_risk" and spec.n_features == 9
    with pytest.raises(ValueError):
        TransactionStream(fraud_feedback_tau_s=86400.0)


def test_featurize_with_feedback_never_uses_a_label_before_it_is_known() -> None:
    from pipeline.evaluate.transactions import featurize_with_feedback

    day = 86400.0
    ts = np.arange(0, 20 * day, day / 4)  # 4 payments a day at one terminal, every one a fraud
    n = len(ts)
    spec = TransactionStream(terminal_context=True, fraud_feedback_tau_s=3 * day)
    cols = featurize_with_feedback(spec, ["c"] * n, ts, np.full(n, 10.0), ["T"] * n, np.ones(n, int), 7 * day)
    risk = cols.base[:, 8]
    assert np.all(risk[ts < 7 * day] == 0.0)  # nothing is known during the first week
    assert risk[ts == 7 * day][0] == pytest.approx(0.5)  # the day-0 label, known exactly a week later
    assert np.all(risk[ts >= 8 * day] > 0.5)
