"""Precision contract: bf16 / int8 are conversions made at load from the fp32 checkpoint; each gives finite
scores close to fp32's on the bundled models, and the checkpoint on disk stays fp32."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.lstm_ae import Checkpoint, bundled_checkpoint_path, cpu_supports_bf16, load_checkpoint, save_checkpoint
from pipeline.config import Settings
from pipeline.features.streams import make_stream
from pipeline.scoring.scorer import StreamScorer
from pipeline.simulate import simulate_sensors, simulate_transactions, strip_labels

# Scores are squared Mahalanobis distances in float64; only the LSTM's reconstruction is lowered. The scale
# that matters is the model's alert threshold, so differences are measured in units of it. Measured on the
# bundled models (simulated traffic with injected anomalies), int8 vs fp32: |diff| / threshold p99 0.013
# (sensors) and 0.010 (transactions), max 0.04 / 0.05; score ranks agree to Spearman 0.999 / 0.996.
# Contract: p99 <= 0.03, max <= 0.10, Spearman >= 0.99.
P99_OF_THRESHOLD, MAX_OF_THRESHOLD, MIN_RANK_CORR = 0.03, 0.10, 0.99


def _windows(stream: str) -> tuple[Checkpoint, np.ndarray]:
    ckpt = load_checkpoint(bundled_checkpoint_path(stream))
    spec: Any = make_stream(stream, channels=ckpt.card["feature_names"], card=ckpt.card)  # either kind, by name
    if stream == "sensors":
        recs, _ = simulate_sensors(20, 120, seed=11, spike_devices=3, drift_devices=2, anomaly_len=15)
    else:
        recs, _ = simulate_transactions(300, 40, seed=12)
    cols = spec.columns([spec.parse(r) for r in strip_labels(recs)])
    scorer = StreamScorer(spec, ckpt, device="cpu")
    return ckpt, scorer.prepare(cols).windows


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("stream", ["sensors", "transactions"])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_lower_precision_scores_are_finite_and_close_to_fp32(stream: str, precision: str) -> None:
    torch.set_num_threads(1)
    ckpt, windows = _windows(stream)
    ref, _, _ = ckpt.score(windows)
    low_ckpt = ckpt.with_precision(precision, "cpu")
    expected = "fp32" if precision == "bf16" and not cpu_supports_bf16() else precision
    assert low_ckpt.precision == expected
    assert low_ckpt.version == ckpt.version and low_ckpt.threshold == ckpt.threshold
    low, contrib, recon = low_ckpt.score(windows)
    assert np.isfinite(low).all() and np.isfinite(contrib).all() and np.isfinite(recon).all()
    diff = np.abs(low - ref) / ckpt.threshold
    assert np.quantile(diff, 0.99) <= P99_OF_THRESHOLD, np.quantile(diff, 0.99)
    assert diff.max() <= MAX_OF_THRESHOLD, diff.max()
    assert _rank_corr(low, ref) >= MIN_RANK_CORR
    if expected == "fp32":
        np.testing.assert_array_equal(low, ref)


def test_bf16_without_cpu_support_falls_back_to_fp32_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    ckpt = load_checkpoint(bundled_checkpoint_path("sensors"))
    with caplog.at_level(logging.WARNING, logger="models.lstm_ae"):
        out = ckpt.with_precision("bf16", "cpu")
    if cpu_supports_bf16():
        assert out.precision == "bf16" and out.autocast_dtype == torch.bfloat16
    else:
        assert out is ckpt
        assert "no native bf16" in caplog.text


def test_conversion_leaves_the_fp32_checkpoint_and_the_file_untouched(tmp_path: Path) -> None:
    path = bundled_checkpoint_path("sensors")
    before = {k: v.clone() for k, v in torch.load(path, weights_only=False)["state_dict"].items()}
    ckpt = load_checkpoint(path)
    q = load_checkpoint(path, precision="int8")
    assert q.precision == "int8" and ckpt.precision == "fp32"
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())  # the fp32 object was copied, not changed
    with pytest.raises(ValueError, match="checkpoints stay fp32"):
        save_checkpoint(q, tmp_path / "q.pt")
    after = torch.load(path, weights_only=False)["state_dict"]
    assert after.keys() == before.keys()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)
    save_checkpoint(ckpt, tmp_path / "again.pt")  # fp32 round trip still works, and converts again at load
    again = load_checkpoint(tmp_path / "again.pt", precision="int8")
    assert again.precision == "int8" and again.version == ckpt.version


def test_unknown_precision_is_refused() -> None:
    ckpt = load_checkpoint(bundled_checkpoint_path("sensors"))
    with pytest.raises(ValueError, match="precision must be one of"):
        ckpt.with_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="already converted"):
        ckpt.with_precision("int8", "cpu").with_precision("bf16", "cpu")


def test_setting_reaches_the_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.app import build_scorers

    monkeypatch.setenv("PIPELINE_PRECISION", "int8")
    s = Settings()
    assert s.precision == "int8"
    scorers = build_scorers(s, {"sensors": load_checkpoint(bundled_checkpoint_path("sensors"))})
    assert scorers[s.sensors_topic].checkpoint.precision == "int8"  # type: ignore[union-attr]
    monkeypatch.setenv("PIPELINE_PRECISION", "fp16")
    with pytest.raises(ValueError):
        Settings()
