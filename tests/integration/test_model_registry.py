"""The model registry on real PostgreSQL (and SQLite): versions with their weights in the database, champion
and challenger aliases, promotion history and rollback, the `pipeline models` commands, drift and compare."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from models.lstm_ae import Checkpoint, load_blob
from models.lstm_forecast import load_model
from pipeline.errors import ConfigError
from pipeline.registry.cli import register as register_models
from pipeline.registry.registry import CHALLENGER, ModelRegistry, RegistryError
from pipeline.sinks import Database
from pipeline.sinks.registry import SqlRegistryStore, model_score_samples, shadow_alerts
from pipeline.sinks.tables import alerts

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "sensors.pt"
CHANNELS = json.loads(BUNDLED.with_suffix(".card.json").read_text())["feature_names"]


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest) -> Iterator[SqlRegistryStore]:
    fresh = request.getfixturevalue("pg_store" if request.param == "postgresql" else "sqlite_store")
    store = SqlRegistryStore(Database(fresh.url))
    try:
        yield store
    finally:
        store.dispose()


@pytest.fixture()
def pg_registry(pg_store: Any) -> Iterator[SqlRegistryStore]:
    store = SqlRegistryStore(Database(pg_store.url))
    try:
        yield store
    finally:
        store.dispose()


def _variant(tmp_path: Path, name: str, *, threshold: float | None = None, **card: Any) -> Path:
    """The bundled sensors checkpoint with another threshold and/or card entries: another version."""
    blob = load_blob(BUNDLED)
    if threshold is not None:
        blob["threshold"] = threshold
    blob["card"] = {**blob["card"], **card}
    path = tmp_path / f"{name}.pt"
    torch.save(blob, path)
    return path


def test_register_is_idempotent_per_stream_and_keeps_the_file(store: SqlRegistryStore, tmp_path: Path) -> None:
    registry = ModelRegistry(store)
    assert registry.register(BUNDLED, "sensors") == "sensors-v1"
    assert registry.register(BUNDLED, "sensors") == "sensors-v1"  # same content, same stream
    assert registry.register(BUNDLED.read_bytes(), "sensors") == "sensors-v1"
    assert registry.register(_variant(tmp_path, "b", threshold=90.0), "sensors") == "sensors-v2"
    assert registry.register(BUNDLED, "pumps") == "pumps-v1"  # numbered per stream
    assert [m.version for m in registry.list()] == ["pumps-v1", "sensors-v1", "sensors-v2"]
    v1 = registry.show("sensors-v1")
    assert v1.content_hash == hashlib.sha256(BUNDLED.read_bytes()).hexdigest()
    assert v1.size == BUNDLED.stat().st_size and v1.family == "lstm_ae" and v1.channels == CHANNELS
    assert [m.version for m in registry.list("sensors")] == ["sensors-v1", "sensors-v2"]
    with pytest.raises(RegistryError, match="not a loadable model checkpoint"):
        registry.register(b"not a checkpoint", "sensors")
    with pytest.raises(RegistryError, match="no model version 'sensors-v9'"):
        registry.show("sensors-v9")


def test_promote_refuses_other_channels_and_keeps_the_champion(store: SqlRegistryStore, tmp_path: Path) -> None:
    registry = ModelRegistry(store)
    v1 = registry.register(BUNDLED, "sensors")
    wrong = registry.register(
        _variant(tmp_path, "wrong", feature_names=[c for c in CHANNELS if c != "Voltage"] + ["Humidity"]), "sensors"
    )
    assert registry.generation() == 0 and registry.current("sensors") is None
    first = registry.promote(v1, "sensors", expected_channels=CHANNELS)
    assert (first.version, first.alias) == (v1, "champion") and first.generation == registry.generation() > 0
    with pytest.raises(RegistryError, match=r"missing Voltage; extra Humidity"):
        registry.promote(wrong, "sensors", expected_channels=CHANNELS)
    still = registry.current("sensors")
    assert still is not None and still.version == v1 and registry.generation() == first.generation
    with pytest.raises(RegistryError, match="registered for stream 'sensors', not 'pumps'"):
        registry.promote(v1, "pumps", expected_channels=None)
    assert registry.promote(v1, "sensors", expected_channels=CHANNELS).generation == first.generation  # no-op


def test_rollback_walks_the_history_back(store: SqlRegistryStore, tmp_path: Path) -> None:
    registry = ModelRegistry(store)
    v1, v2, v3, v4 = (
        registry.register(_variant(tmp_path, f"m{i}", threshold=70.0 + i), "sensors") for i in range(1, 5)
    )
    with pytest.raises(RegistryError, match="no previous version"):
        registry.rollback("sensors")
    for v in (v1, v2, v3):
        registry.promote(v, "sensors", expected_channels=CHANNELS, by="alice")
    registry.delete(v4)  # not in use: fine
    assert registry.rollback("sensors", by="bob").version == v2
    registry.promote(v3, "sensors", expected_channels=CHANNELS)
    assert registry.rollback("sensors").version == v2
    assert registry.rollback("sensors").version == v1
    with pytest.raises(RegistryError, match="sensors@champion has no previous version"):
        registry.rollback("sensors")
    history = store.history("sensors", "champion")
    assert [(h.action, h.version, h.previous_version) for h in history][-2:] == [
        ("rollback", v2, v3),
        ("rollback", v1, v2),
    ]
    assert history[0].by == "alice" and [h.id for h in history] == sorted(h.id for h in history)


def test_rollback_skips_versions_deleted_since(store: SqlRegistryStore, tmp_path: Path) -> None:
    registry = ModelRegistry(store)
    v1, v2, v3 = (registry.register(_variant(tmp_path, f"m{i}", threshold=70.0 + i), "sensors") for i in (1, 2, 3))
    for v in (v1, v2, v3):
        registry.promote(v, "sensors", expected_channels=None)
    registry.delete(v2)
    assert registry.rollback("sensors").version == v1
    # with nothing left behind a deleted one, the refusal says so (it read as if there had been none)
    registry.promote(v3, "sensors", expected_channels=None)
    registry.delete(v1)
    with pytest.raises(RegistryError, match=rf"no previous version to roll back to \(the earlier {v1}: deleted\)"):
        registry.rollback("sensors")


def test_a_deleted_version_id_is_never_given_to_another_model(store: SqlRegistryStore, tmp_path: Path) -> None:
    """A probe deleted pumps-v5 (the newest) and the next registration became pumps-v5 again: the deleted
    model's alerts and samples were then credited to an unrelated model. Numbers only go up, per stream."""
    registry = ModelRegistry(store)
    v1, v2 = (registry.register(_variant(tmp_path, f"d{i}", threshold=80.0 + i), "sensors") for i in (1, 2))
    registry.delete(v2)
    v3 = registry.register(_variant(tmp_path, "d3", threshold=83.0), "sensors")
    assert (v1, v2, v3) == ("sensors-v1", "sensors-v2", "sensors-v3")
    assert registry.register(_variant(tmp_path, "d3", threshold=83.0), "sensors") == v3  # same file: same version
    registry.delete(v3)
    registry.delete(v1)
    assert registry.register(_variant(tmp_path, "d4", threshold=84.0), "sensors") == "sensors-v4"
    assert registry.register(_variant(tmp_path, "p1", threshold=85.0), "pumps") == "pumps-v1"  # per stream


def test_delete_is_refused_while_a_version_serves(store: SqlRegistryStore, tmp_path: Path) -> None:
    registry = ModelRegistry(store)
    v1 = registry.register(BUNDLED, "sensors")
    v2 = registry.register(_variant(tmp_path, "b", threshold=90.0), "sensors")
    registry.promote(v1, "sensors", expected_channels=CHANNELS)
    registry.promote(v2, "sensors", CHALLENGER, expected_channels=CHANNELS)
    for v, alias in ((v1, "champion"), (v2, "challenger")):
        with pytest.raises(RegistryError, match=f"in use as sensors@{alias}"):
            registry.delete(v)
    with pytest.raises(RegistryError, match="a challenger must be another version"):
        registry.promote(v1, "sensors", CHALLENGER, expected_channels=CHANNELS)
    # the challenger promoted to champion stops being the challenger
    registry.promote(v2, "sensors", expected_channels=CHANNELS)
    assert registry.current("sensors", CHALLENGER) is None
    registry.delete(v1)
    assert [m.version for m in registry.list()] == [v2]


def test_resolve_and_load_give_the_files_checkpoint(store: SqlRegistryStore) -> None:
    registry = ModelRegistry(store)
    version = registry.register(BUNDLED, "sensors")
    registry.promote(version, "sensors", expected_channels=CHANNELS)
    resolved = registry.resolve("sensors@champion")
    assert resolved.blob == BUNDLED.read_bytes() and resolved.model.version == version
    assert resolved.card["feature_names"] == CHANNELS
    from_file = load_model(BUNDLED)
    from_registry = registry.load("sensors@champion")
    assert isinstance(from_registry, Checkpoint) and isinstance(from_file, Checkpoint)
    windows = np.random.default_rng(0).normal(size=(16, from_file.config.window, len(CHANNELS))).astype(np.float32)
    np.testing.assert_array_equal(from_registry.score(windows)[0], from_file.score(windows)[0])
    assert from_registry.threshold == from_file.threshold
    with pytest.raises(RegistryError, match="no version is promoted to challenger"):
        registry.resolve("sensors@challenger")
    with pytest.raises(RegistryError, match="expected STREAM@champion|challenger"):
        registry.resolve("sensors@best")


# -- the commands ---------------------------------------------------------------------------------------
def _cli(url: str, *args: str) -> Any:
    app = typer.Typer()
    register_models(app)
    return CliRunner().invoke(app, ["models", *args, "--database-url", url], env={"COLUMNS": "200"})


def test_cli_list_show_promote_rollback_delete(pg_registry: SqlRegistryStore, tmp_path: Path) -> None:
    url = pg_registry.db.url
    registry = ModelRegistry(pg_registry)
    v1 = registry.register(BUNDLED, "sensors")
    v2 = registry.register(_variant(tmp_path, "b", threshold=90.0), "sensors")
    done = _cli(url, "promote", v1, "--stream", "sensors", "--channels", ",".join(CHANNELS), "--by", "ops")
    assert done.exit_code == 0, done.output
    assert "sensors@champion -> sensors-v1" in done.output and "checked against --channels" in done.output
    done = _cli(url, "promote", v2, "--stream", "sensors", "--challenger")  # channels: the bundled stream file
    assert done.exit_code == 0 and "the stream file" in done.output, done.output
    listed = _cli(url, "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["version"], r["aliases"]) for r in rows] == [(v1, ["champion"]), (v2, ["challenger"])]
    assert "card" not in rows[0]
    shown = _cli(url, "show", "sensors@champion", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["card"]["feature_names"] == CHANNELS
    table = _cli(url, "list")
    assert table.exit_code == 0 and "sensors-v2" in table.stdout and "challenger" in table.stdout
    refused = _cli(url, "delete", v1)
    assert isinstance(refused.exception, RegistryError) and "in use as sensors@champion" in str(refused.exception)
    promoted = _cli(url, "promote", v2, "--stream", "sensors")
    assert promoted.exit_code == 0 and "sensors@challenger cleared: sensors-v2 is the champion now" in promoted.output
    back = _cli(url, "rollback", "--stream", "sensors")
    assert back.exit_code == 0 and "sensors@champion -> sensors-v1" in back.output


def test_cli_refusal_is_one_line_and_exit_2(pg_registry: SqlRegistryStore, tmp_path: Path) -> None:
    registry = ModelRegistry(pg_registry)
    v1 = registry.register(BUNDLED, "sensors")
    registry.promote(v1, "sensors", expected_channels=CHANNELS)
    wrong = registry.register(_variant(tmp_path, "wrong", feature_names=CHANNELS[:-1]), "sensors")
    args = ["models", "promote", wrong, "--stream", "sensors", "--database-url", pg_registry.db.url]
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: cannot promote {wrong} to sensors@champion: its channels do not match the stream's "
        f"(missing {CHANNELS[-1]})"
    ]
    champion = registry.current("sensors")
    assert champion is not None and champion.version == v1


def test_promote_with_a_stream_file_that_does_not_declare_the_stream_is_refused(
    pg_registry: SqlRegistryStore, tmp_path: Path
) -> None:
    """`promote sensors-v1 --stream sensors --streams-file chillers.toml` (the wrong plant's file) promoted
    without checking anything: the named file had no such stream, so the check fell back to nothing."""
    registry = ModelRegistry(pg_registry)
    v1 = registry.register(BUNDLED, "sensors")
    other = tmp_path / "chillers.toml"
    other.write_text(
        '[[streams]]\nname = "chillers"\ntopic = "plant.chillers"\nkind = "sensors"\nentity_key = "chiller_id"\n'
        'time_field = "at"\nmodel = "chillers@champion"\n[[streams.channels]]\nname = "supply_temp"\n'
    )
    refused = _cli(pg_registry.db.url, "promote", v1, "--stream", "sensors", "--streams-file", str(other))
    assert isinstance(refused.exception, ConfigError), refused.output
    assert "declares no stream 'sensors'" in str(refused.exception) and "chillers" in str(refused.exception)
    assert registry.current("sensors") is None


def _samples(store: SqlRegistryStore, version: str, scores: np.ndarray) -> None:
    now = datetime.now(timezone.utc)
    rows = [
        {
            "run_id": "live",
            "stream": "sensors",
            "model_version": version,
            "entity_id": f"M{i % 7}",
            "event_time": now - timedelta(seconds=len(scores) - i),
            "score": float(s),
        }
        for i, s in enumerate(scores)
    ]
    with store.db.engine.begin() as conn:
        conn.execute(model_score_samples.insert(), rows)


def test_cli_drift_exits_1_above_the_limit(
    pg_registry: SqlRegistryStore, tmp_path: Path, kafka_bootstrap: str, topic_prefix: str
) -> None:
    from pipeline.kafka.client import ensure_topics, make_producer, produce_json

    rng = np.random.default_rng(0)
    normal = rng.gamma(2.0, 3.0, 20_000)
    voltage = rng.normal(230.0, 5.0, 20_000)
    levels = (0.1, 0.5, 0.9, 0.99)
    card: dict[str, Any] = {
        "metrics": {
            "val_score_quantiles": {str(q): float(v) for q, v in zip(levels, np.quantile(normal, levels), strict=True)}
        },
        "channel_stats": {
            "Voltage": {
                "mean": 230.0,
                "std": 5.0,
                "quantiles": {str(q): float(v) for q, v in zip(levels, np.quantile(voltage, levels), strict=True)},
            }
        },
    }
    registry = ModelRegistry(pg_registry)
    version = registry.register(_variant(tmp_path, "carded", **card), "sensors")
    url = pg_registry.db.url
    missing = _cli(url, "drift", "--stream", "sensors")
    assert isinstance(missing.exception, RegistryError) and "has no champion" in str(missing.exception)
    registry.promote(version, "sensors", expected_channels=CHANNELS)
    empty = _cli(url, "drift", "--stream", "sensors")
    assert isinstance(empty.exception, RegistryError) and "nothing to measure" in str(empty.exception)

    _samples(pg_registry, version, rng.gamma(2.0, 3.0, 3_000))
    flat = _cli(url, "drift", "--stream", "sensors", "--json")
    assert flat.exit_code == 0, flat.output
    (score,) = json.loads(flat.stdout)["figures"]
    assert score["figure"] == "score PSI" and score["n"] == 3_000 and score["psi"] < 0.1

    topic = f"{topic_prefix}-sensors"
    ensure_topics(kafka_bootstrap, [topic], 1)
    producer = make_producer(kafka_bootstrap)
    try:
        shifted = rng.normal(240.0, 5.0, 400)  # two training std up
        produce_json(producer, topic, [(f"M{i}", {"values": {"Voltage": float(v)}}) for i, v in enumerate(shifted)])
    finally:
        producer.close()
    args = ("drift", "--stream", "sensors", "--json", "--bootstrap", kafka_bootstrap, "--topic", topic)
    moved = _cli(url, *args, "--records", "300")
    assert moved.exit_code == 1, moved.output
    figures = {f["figure"]: f for f in json.loads(moved.stdout)["figures"]}
    assert figures["input Voltage"]["n"] == 300 and figures["input Voltage"]["psi"] > 0.25
    assert figures["input Voltage"]["mean_shift"] == pytest.approx(2.0, abs=0.3)
    assert _cli(url, *args, "--limit", "50").exit_code == 0


def _alert(version: str, offset: int, entity: str, label: str | None = None) -> dict[str, Any]:
    t = datetime(2026, 5, 1, tzinfo=timezone.utc) + timedelta(minutes=offset)
    return {
        "alert_key": f"live|tx|0|{offset}|{version}",
        "run_id": "live",
        "stream": "sensors",
        "entity_id": entity,
        "event_time": t,
        "score": 99.0,
        "threshold": 50.0,
        "severity": "high",
        "model_version": version,
        "top_features": [],
        "source_topic": "tx",
        "source_partition": 0,
        "source_offset": offset,
        "created_at": t,
        "label": label,
    }


def test_cli_compare_reads_alerts_and_shadow_alerts(pg_registry: SqlRegistryStore, tmp_path: Path) -> None:
    registry = ModelRegistry(pg_registry)
    v1 = registry.register(BUNDLED, "sensors")
    v2 = registry.register(_variant(tmp_path, "b", threshold=90.0), "sensors")
    with pg_registry.db.engine.begin() as conn:
        conn.execute(
            alerts.insert(),
            [_alert(v1, 1, "M1", "tp"), _alert(v1, 2, "M1", "fp"), _alert(v1, 60, "M2")],
        )
        conn.execute(shadow_alerts.insert(), [_alert(v2, 1, "M1"), _alert(v2, 5, "M3")])
    _samples(pg_registry, v1, np.arange(100.0))
    _samples(pg_registry, v2, np.arange(100.0) * 2)
    png = tmp_path / "scores.png"
    done = _cli(pg_registry.db.url, "compare", v1, v2, "--stream", "sensors", "--json", "--png", str(png))
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.splitlines()[0])
    assert (result["a"]["alerts"], result["b"]["alerts"]) == (3, 2)
    assert result["a"]["alerts_per_hour"] == pytest.approx(3 * 60 / 59)  # over the 59 minutes from first to last
    assert (result["events_both"], result["events_only_a"], result["events_only_b"]) == (1, 2, 1)
    assert result["entity_jaccard"] == pytest.approx(1 / 3)
    assert (result["a"]["precision"], result["b"]["precision"]) == (0.5, 1.0)
    assert result["b"]["score_quantiles"]["0.5"] == pytest.approx(2 * result["a"]["score_quantiles"]["0.5"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = _cli(pg_registry.db.url, "compare", v1, v2)
    assert table.exit_code == 0 and "precision (labelled)" in table.stdout


def test_cli_compare_counts_an_event_once_scopes_to_a_run_and_rates_over_event_time(
    pg_registry: SqlRegistryStore, tmp_path: Path
) -> None:
    """A probe's compare counted the same events once per run (the live run and two replays: 572 alerts for
    ~110), had no way to scope to one run, and divided alerts of last May's events by the time since then."""
    registry = ModelRegistry(pg_registry)
    v1 = registry.register(BUNDLED, "sensors")
    v2 = registry.register(_variant(tmp_path, "b", threshold=90.0), "sensors")
    live = [_alert(v1, m, "M1") for m in (1, 2, 60)]
    replay = [{**a, "run_id": "whatif", "alert_key": a["alert_key"].replace("live", "whatif")} for a in live]
    replay[0]["label"] = "tp"  # a verdict on the replay's copy counts for the event
    with pg_registry.db.engine.begin() as conn:
        later = {**_alert(v1, 90, "M4"), "run_id": "whatif", "alert_key": "w90"}
        conn.execute(alerts.insert(), [*live, *replay, later])
        conn.execute(shadow_alerts.insert(), [_alert(v2, 1, "M1")])
    url = pg_registry.db.url

    every = json.loads(_cli(url, "compare", v1, v2, "--json").stdout.splitlines()[0])
    assert every["a"]["alerts"] == 4 and every["a"]["precision"] == 1.0  # events 1, 2, 60, 90: once each
    one_run = json.loads(_cli(url, "compare", v1, v2, "--run-id", "live", "--json").stdout.splitlines()[0])
    assert one_run["a"]["alerts"] == 3 and one_run["a"]["precision"] is None
    since = json.loads(_cli(url, "compare", v1, v2, "--since", "2026-05-01T00:00:00Z", "--json").stdout.splitlines()[0])
    assert since["a"]["alerts_per_hour"] == pytest.approx(4 / 1.5)  # 4 alerts over 90 minutes of event time
    # --since after everything the versions scored: no window, no rate (it read -0 per hour)
    after = _cli(url, "compare", v1, v2, "--since", "2030-01-01T00:00:00Z", "--json").stdout.splitlines()[0]
    assert json.loads(after)["a"]["alerts_per_hour"] is None


def test_promote_checks_the_channel_roles_as_the_service_will(pg_registry: SqlRegistryStore, tmp_path: Path) -> None:
    """A probe's stream file declared one of the model's scored channels as context: promote passed ("channels
    checked against the stream file") and `pipeline run` then refused to start. Promote now makes run's check."""
    registry = ModelRegistry(pg_registry)
    v1 = registry.register(BUNDLED, "sensors")
    roles = tmp_path / "roles.toml"
    context = 'role = "context"\n'
    channels = "".join(f'[[streams.channels]]\nname = "{c}"\n' + context * (i == 0) for i, c in enumerate(CHANNELS))
    roles.write_text(
        '[[streams]]\nname = "sensors"\ntopic = "plant.sensors"\nkind = "sensors"\nentity_key = "device_id"\n'
        f'time_field = "timestamp"\nmodel = "sensors@champion"\n{channels}'
    )
    refused = _cli(pg_registry.db.url, "promote", v1, "--stream", "sensors", "--streams-file", str(roles))
    assert isinstance(refused.exception, ConfigError), refused.output
    assert "the model scores" in str(refused.exception) and "nothing was promoted" in str(refused.exception)
    assert registry.current("sensors") is None
    fits = tmp_path / "fits.toml"
    fits.write_text(roles.read_text().replace(context, ""))
    done = _cli(pg_registry.db.url, "promote", v1, "--stream", "sensors", "--streams-file", str(fits))
    assert done.exit_code == 0, done.output


def test_register_checks_the_checkpoint_against_a_declared_stream(
    pg_registry: SqlRegistryStore, tmp_path: Path
) -> None:
    """A probe registered a chillers checkpoint as a pumps version: nothing checked it until a promote. Where
    the stream file declares the stream, register refuses what `pipeline run` would; an undeclared stream is
    noted and registered."""
    wrong = _variant(tmp_path, "wrong", feature_names=CHANNELS[:-1])
    refused = _cli(pg_registry.db.url, "register", str(wrong), "--stream", "sensors")  # the bundled stream file
    assert isinstance(refused.exception, ConfigError), refused.output
    assert "cannot be served" in str(refused.exception) and "nothing was registered" in str(refused.exception)
    assert ModelRegistry(pg_registry).list("sensors") == []
    done = _cli(pg_registry.db.url, "register", str(BUNDLED), "--stream", "sensors")
    assert done.exit_code == 0 and done.stdout.strip() == "sensors-v1", done.output
    plant = tmp_path / "plant.toml"
    plant.write_text(
        '[[streams]]\nname = "pumps"\ntopic = "plant.pumps"\nkind = "sensors"\nentity_key = "pump_id"\n'
        'time_field = "at"\nmodel = "pumps@champion"\n[[streams.channels]]\nname = "flow"\n'
    )
    noted = _cli(pg_registry.db.url, "register", str(BUNDLED), "--stream", "boilers", "--streams-file", str(plant))
    assert noted.exit_code == 0 and "declares no stream 'boilers'" in noted.stderr, noted.output
