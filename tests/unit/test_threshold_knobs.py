"""Threshold knobs are declared once (ThresholdKnobs) and reach every scorer: the service's environment, the
evaluation formats' overrides, and the scorer factory that the service, replay and bench share."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from models.lstm_ae import bundled_checkpoint_path, load_checkpoint
from pipeline.config import Settings
from pipeline.evaluate import common, nasa, skab, sweep
from pipeline.features.streams import EventColumns
from pipeline.scoring.factory import build_scorer
from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.scoring.threshold import AdaptiveThreshold
from pipeline.simulate import SENSOR_CHANNELS


def test_environment_names_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (
        ("WARMUP", "5"),
        ("Z", "2.5"),
        ("FLOOR_RATIO", "0.5"),
        ("MIN_HISTORY", "3"),
        ("SMOOTHING", ".3"),
    ):
        monkeypatch.setenv(f"PIPELINE_THRESHOLD_{name}", value)
    monkeypatch.setenv("PIPELINE_ALERTS_RESOLVE_AFTER", "9")  # the other nested section still reads its own
    monkeypatch.setenv("PIPELINE_ALERTS_TOPIC", "my-alerts")  # and a flat field sharing its prefix stays flat
    s = Settings()
    assert s.threshold == ThresholdKnobs(warmup=5, z=2.5, floor_ratio=0.5, min_history=3, smoothing=0.3)
    assert s.alerts.resolve_after == 9 and s.alerts_topic == "my-alerts"
    monkeypatch.setenv("PIPELINE_THRESHOLD_SMOOTHING", "0")
    with pytest.raises(ValidationError, match="smoothing"):
        Settings()


def test_the_factory_builds_the_services_scorer_from_the_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.app import build_scorers

    monkeypatch.setenv("PIPELINE_THRESHOLD_Z", "2.5")
    monkeypatch.setenv("PIPELINE_THRESHOLD_MIN_HISTORY", "3")
    s = Settings(device="cpu")
    ckpt = load_checkpoint(bundled_checkpoint_path("sensors"))
    service = build_scorers(s, {"sensors": ckpt})[s.sensors_topic]
    assert service.threshold == AdaptiveThreshold(ckpt.threshold, s.threshold) and service.min_history == 3
    alone = build_scorer("sensors", ckpt, knobs=s.threshold, allowed_lateness_s=s.allowed_lateness_s)
    rng = np.random.default_rng(0)
    cols = EventColumns([f"d{i % 3}" for i in range(60)], np.arange(60.0), rng.normal(1.0, 0.1, (60, 8)))
    a, b = service.process(cols), alone.process(cols)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
    assert alone.spec.feature_names == list(SENSOR_CHANNELS)


def test_format_overrides_name_the_knobs_flat() -> None:
    cfg = common.configured(skab.SkabConfig(), {"z": 3.0, "epochs": 2})
    assert cfg.threshold == ThresholdKnobs(z=3.0, floor_ratio=0.0, smoothing=0.3) and cfg.epochs == 2
    assert common.configured(nasa.NasaConfig(), {}).threshold.min_history == 16
    assert sweep.parse_overrides(["smoothing=0.5", "family=lstm_ae"], skab.SkabConfig) == {
        "smoothing": 0.5,
        "family": "lstm_ae",
    }
    with pytest.raises(TypeError):
        common.configured(skab.SkabConfig(), {"zz": 1})


def test_a_models_card_knobs_are_served_unless_the_configuration_sets_its_own() -> None:
    card = {"z": 2.5, "smoothing": 0.3, "floor_ratio": 0.0, "some_future_knob": 1}
    assert ThresholdKnobs.served(ThresholdKnobs(), None) == ThresholdKnobs()
    assert ThresholdKnobs.served(ThresholdKnobs(), card) == ThresholdKnobs(z=2.5, smoothing=0.3, floor_ratio=0.0)
    operator = ThresholdKnobs.served(ThresholdKnobs(z=5.0, warmup=10), card)  # set away from the defaults: theirs
    assert operator == ThresholdKnobs(z=5.0, warmup=10, smoothing=0.3, floor_ratio=0.0)


def test_a_card_with_impossible_knobs_is_a_clear_error() -> None:
    from dataclasses import replace

    from pipeline.errors import ConfigError

    ckpt = load_checkpoint(bundled_checkpoint_path("sensors"))
    bad = replace(ckpt, card={**ckpt.card, "threshold_knobs": {"z": 2.0, "z_release": 3.0}})
    with pytest.raises(ConfigError, match="threshold knobs: z_release"):
        build_scorer("sensors", bad, channels=SENSOR_CHANNELS)
