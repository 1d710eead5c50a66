"""The live drift monitor (pipeline.processing.drift) on the real sensors scorer: flat on an unshifted fixture,
rising on a shifted one, gauges per stream and channel as the card allows, and a new champion version starting
its window over."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from models.lstm_ae import Checkpoint
from pipeline.api import create_app
from pipeline.app import build_scorers, ensure_models
from pipeline.config import Settings
from pipeline.processing.drift import DriftMonitor
from pipeline.processing.samples import warm_events
from pipeline.registry import drift
from pipeline.scoring.scorer import StreamScorer
from pipeline.simulate import simulate_sensors, strip_labels
from pipeline.sinks import AlertQueries, Database

LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
SHIFTED = ("Pressure", "Temperature")


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(device="cpu", sensors_topic="s")


@pytest.fixture(scope="module")
def bundled(settings: Settings) -> Checkpoint:
    ckpt = ensure_models(settings)["sensors"]
    assert isinstance(ckpt, Checkpoint)
    return ckpt


@pytest.fixture(scope="module")
def phases() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Normal readings in time order: a warm-up, a reference part (the card's statistics) and a live part."""
    recs = sorted(strip_labels(simulate_sensors(8, 300, seed=11)[0]), key=lambda r: r["timestamp"])
    n = len(recs)
    return recs[: n // 2], recs[n // 2 : 3 * n // 4], recs[3 * n // 4 :]


def _scorer(settings: Settings, model: Checkpoint) -> StreamScorer:
    return build_scorers(settings, {"sensors": model})["s"]


def _feed(
    scorer: StreamScorer, recs: Sequence[dict[str, Any]], monitor: DriftMonitor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Batches of 600 through the scorer (and the monitor); the warm events' scores and every event's inputs."""
    scores, inputs = [], []
    for i in range(0, len(recs), 600):
        spec = scorer.spec
        res = scorer.process(spec.columns([spec.decode(orjson.dumps(r)) for r in recs[i : i + 600]]))
        warm = warm_events(scorer, res)
        scores.append(res.raw_scores[warm])
        inputs.append(res.observed)
        if monitor is not None:
            monitor.observe(scorer, res, warm)
    return np.concatenate(scores), np.concatenate(inputs)


@pytest.fixture(scope="module")
def carded(settings: Settings, bundled: Checkpoint, phases: Any) -> Checkpoint:
    """The bundled model with a card as `pipeline train --stream` writes it: score quantiles and channel_stats
    of the reference part."""
    warmup, reference, _ = phases
    scorer = _scorer(settings, bundled)
    _feed(scorer, warmup)
    scores, inputs = _feed(scorer, reference)
    names = scorer.spec.feature_names
    card = {
        **bundled.card,
        "version": "sensors-carded",
        "metrics": {**bundled.card["metrics"], "val_score_quantiles": _quantiles(scores)},
        "channel_stats": {
            name: {
                "mean": float(inputs[:, j].mean()),
                "std": float(inputs[:, j].std()),
                "quantiles": _quantiles(inputs[:, j]),
            }
            for j, name in enumerate(names)
        },
    }
    return replace(bundled, card=card)


def _quantiles(x: np.ndarray) -> dict[str, float]:
    return {str(level): float(np.quantile(x, level)) for level in LEVELS}


def _shift(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same readings with two channels 30 % higher (a recalibrated or failing sensor)."""
    return [{**r, "values": {c: v * 1.3 if c in SHIFTED else v for c, v in r["values"].items()}} for r in recs]


def _live_figures(settings: Settings, model: Checkpoint, phases: Any, live: Sequence[dict[str, Any]]) -> dict[str, Any]:
    warmup, reference, _ = phases
    scorer = _scorer(settings, model)
    _feed(scorer, [*warmup, *reference])  # the entities are warm, as in a running service
    monitor = DriftMonitor(refresh_s=3600.0)
    _feed(scorer, live, monitor)
    monitor.refresh()
    (figures,) = monitor.figures()
    return figures


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_drift_stays_flat_on_unshifted_inputs_and_rises_on_shifted_ones(
    settings: Settings, carded: Checkpoint, phases: Any
) -> None:
    flat = _live_figures(settings, carded, phases, phases[2])
    assert flat["model_version"] == "sensors-carded" and flat["warming_share"] == 0.0
    assert flat["score"]["psi"] < drift.STABLE_BELOW
    assert {c["channel"] for c in flat["inputs"]} == set(carded.card["channel_stats"])
    assert max(c["psi"] for c in flat["inputs"]) < drift.STABLE_BELOW
    assert _gauge("pipeline_score_psi", stream="sensors") == flat["score"]["psi"]

    shifted = _live_figures(settings, carded, phases, _shift(phases[2]))
    assert shifted["score"]["psi"] > drift.SHIFT_ABOVE
    by_channel = {c["channel"]: c["psi"] for c in shifted["inputs"]}
    assert all(by_channel[c] > drift.SHIFT_ABOVE for c in SHIFTED)
    assert all(psi < drift.STABLE_BELOW for c, psi in by_channel.items() if c not in SHIFTED)
    assert _gauge("pipeline_input_psi", stream="sensors", channel="Temperature") == by_channel["Temperature"]
    assert _gauge("pipeline_warming_share", stream="sensors") == 0.0


def test_a_new_champion_starts_over_against_its_own_card(
    settings: Settings, bundled: Checkpoint, carded: Checkpoint, phases: Any
) -> None:
    warmup, _, live = phases
    monitor = DriftMonitor(refresh_s=3600.0)
    _feed(_scorer(settings, carded), live, monitor)
    monitor.refresh()
    assert monitor.figures()[0]["inputs"]
    # the bundled card has legacy score quantiles (p50, p99) and no channel_stats: a score figure, no input gauges
    fresh = _scorer(settings, bundled)
    _feed(fresh, warmup[:50], monitor)
    monitor.refresh()
    (figures,) = monitor.figures()
    assert figures["model_version"] == bundled.version and figures["inputs"] == []
    assert figures["score"] is None  # too few values of the new version yet
    assert figures["warming_share"] == 1.0  # 50 readings of 8 devices: none has min_history events yet
    assert _gauge("pipeline_input_psi", stream="sensors", channel="Temperature") is None
    _feed(fresh, warmup[50:], monitor)
    monitor.refresh()
    (figures,) = monitor.figures()
    assert figures["score"]["n"] > 0 and figures["warming_share"] == 0.0


def test_the_api_serves_the_live_figures_of_the_processor_it_runs_with(
    settings: Settings, carded: Checkpoint, phases: Any, tmp_path: Path
) -> None:
    monitor = DriftMonitor(refresh_s=3600.0)
    _feed(_scorer(settings, carded), phases[2], monitor)
    monitor.refresh()
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    db.create_schema()
    live = TestClient(create_app(AlertQueries(db), settings, drift=monitor.figures)).get("/api/drift").json()
    assert live == {"live": True, "streams": json.loads(json.dumps(monitor.figures()))}
    standalone = TestClient(create_app(AlertQueries(db), settings)).get("/api/drift").json()
    assert standalone["live"] is False and standalone["streams"] == []
    page = TestClient(create_app(AlertQueries(db), settings)).get("/").text
    assert 'id="drift"' in page


def test_figures_asked_for_after_the_stream_went_quiet_are_recomputed(
    settings: Settings, bundled: Checkpoint, phases: Any
) -> None:
    """A probe's /api/drift showed warming_share 1.0 and no score figure after 24k events: the figures were
    computed with the first batch of a burst, and nothing recomputed them once the stream went quiet."""
    warmup, _, _ = phases
    now = [0.0]
    monitor = DriftMonitor(refresh_s=2.0, clock=lambda: now[0])
    scorer = _scorer(settings, bundled)
    _feed(scorer, warmup[:50], monitor)  # the first batch: every entity still warming
    now[0] = 1.0
    _feed(scorer, warmup[50:], monitor)  # the rest of the burst, inside refresh_s: not recomputed
    assert monitor.figures()[0]["warming_share"] == 1.0
    now[0] = 5.0  # quiet since: the next look recomputes
    (figures,) = monitor.figures()
    assert figures["warming_share"] == 0.0 and figures["score"]["n"] > 0
