"""The streams of a stream file as the service serves them: each model resolved (bundled, a file next to the
stream file, the registry by alias or version id) and refused at start when it does not fit its stream; the
declared name (not the kind) keys alerts, entity state and metrics, and the stream's own entity/time field
names decode on the processing path with the kind's dead-letter reasons. Real SQLite registry and store."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from models.lstm_ae import LSTMAEConfig, TrainConfig, bundled_checkpoint_path, save_checkpoint
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.features.streams import EventColumns, SensorStream
from pipeline.processing.dead_letters import DeadLetters
from pipeline.processing.decode import decode
from pipeline.processing.retry import DbRetry
from pipeline.processing.stats import ProcessorStats
from pipeline.processor import Processor, ProcessorOptions
from pipeline.records import RawRecord
from pipeline.registry import ModelRegistry
from pipeline.sinks import SqlRegistryStore
from pipeline.state.partition import Partitions
from pipeline.streams.config import bundled_streams_file, load_streams
from pipeline.streams.serving import ServedStream, resolve_model, serve
from pipeline.training import train_stream_model
from tests.sql_helpers import SqlTestStore
from tests.unit.test_label_alignment import ListDeadLetters, MemoryLog

PUMP_CHANNELS = ["flow", "pressure", "vibration"]
T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)


def pumps_file(folder: Path, model: str, *, roles: dict[str, str] | None = None) -> Path:
    """A stream file with one sensors stream `pumps` (entity pump_id, time at) served by `model`."""
    channels = "".join(
        f'[[streams.channels]]\nname = "{c}"\nrole = "{(roles or {}).get(c, "scored")}"\n' for c in PUMP_CHANNELS
    )
    path = folder / "plant.toml"
    path.write_text(
        f'[[streams]]\nname = "pumps"\ntopic = "plant.pumps"\nkind = "sensors"\nentity_key = "pump_id"\n'
        f'time_field = "at"\nmodel = "{model}"\n{channels}'
    )
    return path


def pump_reading(pump: str, i: int, fault: float = 0.0) -> dict[str, Any]:
    phase = i / 5.0
    return {
        "pump_id": pump,
        "at": (T0 + timedelta(seconds=10 * i)).isoformat(),
        "values": {"flow": 10 + math.sin(phase) + fault, "pressure": 3 + 0.5 * math.cos(phase), "vibration": 0.2},
    }


@pytest.fixture(scope="module")
def pumps_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small autoencoder for the three pump channels, saved as models/pumps.pt of a plant folder."""
    spec = SensorStream(PUMP_CHANNELS)
    rows = [pump_reading(f"P{e}", i) for i in range(120) for e in range(4)]
    cols = EventColumns(
        [r["pump_id"] for r in rows],
        np.array([datetime.fromisoformat(r["at"]).timestamp() for r in rows]),
        np.array([[r["values"][c] for c in PUMP_CHANNELS] for r in rows]),
    )
    ckpt = train_stream_model(
        spec,
        cols,
        model=LSTMAEConfig(n_features=3, window=4, hidden_size=8, latent_size=2),
        train=TrainConfig(epochs=2),
        min_history=2,
        name="pumps-lstm-ae",
    )
    folder = tmp_path_factory.mktemp("plant")
    (folder / "models").mkdir()
    return save_checkpoint(ckpt, folder / "models" / "pumps.pt")


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    store = SqlRegistryStore.connect(f"sqlite:///{tmp_path / 'registry.db'}")
    yield ModelRegistry(store)
    store.dispose()


def test_the_bundled_default_serves_todays_streams_under_their_names() -> None:
    served = serve(load_streams(bundled_streams_file()).streams, registry=None)
    by_name = {s.stream.name: s for s in served}
    assert sorted(by_name) == ["sensors", "transactions"]
    for name, s in by_name.items():
        assert s.model.version == s.model.checkpoint.card["version"]  # the card's version, as before
        spec = s.spec()
        assert (spec.name, spec.kind) == (name, name)


def test_a_streams_context_gap_reaches_its_scorer(pumps_model: Path) -> None:
    from pipeline.app import stream_scorers

    text = pumps_file(pumps_model.parent.parent, "models/pumps.pt").read_text()
    gapped = pumps_model.parent.parent / "gapped.toml"
    gapped.write_text(text.replace('kind = "sensors"', 'kind = "sensors"\ncontext_gap_s = 600', 1))
    for path, gap in ((gapped, 600.0), (pumps_model.parent.parent / "plant.toml", None)):
        stream = load_streams(path).stream("pumps")
        scorer = next(
            iter(stream_scorers(Settings(device="cpu"), [ServedStream(stream, resolve_model(stream, None))]).values())
        )
        assert stream.context_gap_s == gap and scorer.context_gap_s == gap


def test_a_model_file_is_relative_to_the_stream_file(pumps_model: Path) -> None:
    stream = load_streams(pumps_file(pumps_model.parent.parent, "models/pumps.pt")).stream("pumps")
    model = resolve_model(stream, registry=None)
    assert model.version == model.checkpoint.version == model.checkpoint.card["version"]
    assert model.version.startswith("pumps-lstm-ae@")


def test_a_registry_model_by_alias_or_version_id_carries_the_registry_version(
    pumps_model: Path, registry: ModelRegistry, tmp_path: Path
) -> None:
    version = registry.register(pumps_model, "pumps")
    registry.promote(version, "pumps", expected_channels=PUMP_CHANNELS)
    for ref in ("pumps@champion", version):
        stream = load_streams(pumps_file(tmp_path, ref)).stream("pumps")
        model = resolve_model(stream, registry)
        assert model.version == model.checkpoint.version == version == "pumps-v1"
        assert model.checkpoint.card["card_version"].startswith("pumps-lstm-ae@")


def test_a_model_that_does_not_fit_its_stream_is_refused_naming_stream_and_channels(
    pumps_model: Path, registry: ModelRegistry, tmp_path: Path
) -> None:
    shutil.copy(bundled_checkpoint_path("sensors"), tmp_path / "sensors.pt")
    wrong_channels = load_streams(pumps_file(tmp_path, "sensors.pt")).stream("pumps")
    with pytest.raises(ConfigError) as err:
        resolve_model(wrong_channels, registry=None)
    message = str(err.value)
    assert "stream 'pumps'" in message and "the stream declares flow, pressure, vibration" in message
    assert "missing flow, pressure, vibration" in message and "Accelerometer1RMS" in message

    (tmp_path / "models").mkdir()
    shutil.copy(pumps_model, tmp_path / "models" / "pumps.pt")
    context_flow = load_streams(pumps_file(tmp_path, "models/pumps.pt", roles={"flow": "context"})).stream("pumps")
    with pytest.raises(ConfigError, match=r"stream 'pumps'.*model scores flow, pressure, vibration; the stream's "):
        resolve_model(context_flow, registry=None)

    by_alias = load_streams(pumps_file(tmp_path, "pumps@champion")).stream("pumps")
    with pytest.raises(ConfigError, match="model registry, which lives in the database"):
        resolve_model(by_alias, registry=None)
    with pytest.raises(ConfigError, match=r"stream 'pumps': pumps@champion: no version is promoted to champion"):
        resolve_model(by_alias, registry)


def _dead_letter_count(topic: str, reason: str) -> float:
    return REGISTRY.get_sample_value("pipeline_dead_letters_total", {"topic": topic, "reason": reason}) or 0.0


def test_the_streams_own_fields_decode_on_the_processing_path_with_the_kinds_reasons(pumps_model: Path) -> None:
    stream = load_streams(pumps_file(pumps_model.parent.parent, "models/pumps.pt")).stream("pumps")
    spec = ServedStream(stream, resolve_model(stream, registry=None)).spec()
    dlq = ListDeadLetters()
    dead = DeadLetters(dlq, Partitions(), ProcessorStats(DbRetry(1.0)))

    def raw(key: bytes | None, value: dict[str, Any] | bytes) -> RawRecord:
        return RawRecord("plant.pumps", 0, 0, key, value if isinstance(value, bytes) else orjson.dumps(value), 0)

    rec = decode(spec, raw(b"P1", pump_reading("P1", 0)), dead)
    assert rec is not None and spec.entity_of(rec) == "P1" and dlq.sent == []
    wire_names = {"device_id": "P1", "timestamp": T0.isoformat(), "values": pump_reading("P1", 0)["values"]}
    bad = [
        raw(b"P2", pump_reading("P1", 0)),  # key_mismatch
        raw(None, pump_reading("P1", 0)),  # missing_key
        raw(b"P1", {**pump_reading("P1", 0), "values": {"flow": 1.0}}),  # missing_channels
        raw(b"P1", {"pump_id": "P1", "values": {"flow": 1.0}}),  # missing_field (at)
        raw(b"P1", {**pump_reading("P1", 0), "device_id": "P1"}),  # schema_violation
        raw(b"P1", wire_names),  # the kind's names instead of the stream's: schema_violation
        raw(b"P1", b'{"pump_id": "P1", "pump_id": "P2"}'),
        raw(b"P1", b"{"),
    ]
    malformed_before = _dead_letter_count("plant.pumps", "malformed_json")
    for r in bad:
        assert decode(spec, r, dead) is None
    # operators with several streams see which topic sends bad records
    assert _dead_letter_count("plant.pumps", "malformed_json") == malformed_before + 1
    assert [reason for _, reason in dlq.sent] == [
        "key_mismatch",
        "missing_key",
        "missing_channels",
        "missing_field",
        "schema_violation",
        "schema_violation",
        "duplicate_key",
        "malformed_json",
    ]


def test_alerts_and_entity_state_carry_the_declared_stream_name_and_served_version(
    pumps_model: Path, registry: ModelRegistry, tmp_path: Path
) -> None:
    version = registry.register(pumps_model, "pumps")
    registry.promote(version, "pumps", expected_channels=PUMP_CHANNELS)
    stream = load_streams(pumps_file(tmp_path, "pumps@champion")).stream("pumps")
    settings = Settings(device="cpu")
    from pipeline.app import stream_scorers

    scorers = stream_scorers(settings, [ServedStream(stream, resolve_model(stream, registry))])
    readings = [pump_reading("P1", i) for i in range(60)] + [pump_reading("P1", 60, fault=500.0)]
    records = [
        RawRecord("plant.pumps", 0, i, r["pump_id"].encode(), orjson.dumps(r), 0) for i, r in enumerate(readings)
    ]
    db = SqlTestStore(f"sqlite:///{tmp_path / 'alerts.db'}")
    db.create_schema()
    src = MemoryLog({("plant.pumps", 0): len(records)}, [records])
    proc = Processor(src, db, ListDeadLetters(), scorers, ProcessorOptions(max_batch_records=1000))
    src.subscribe(list(scorers), proc.on_assigned, proc.on_revoked)
    proc.handle(src.poll(0, 0))
    proc.checkpointer.checkpoint(snapshot=True)
    alerts = db.list_alerts(run_id="live")
    assert alerts, "the fault of 500 in flow is an anomaly"
    assert {(a["stream"], a["model_version"], a["entity_id"]) for a in alerts} == {("pumps", "pumps-v1", "P1")}
    assert proc.stats.alerts_by_stream == {"pumps": len(alerts)}
    assert set(db.load_states("live", "pumps", ["P1"])) == {"P1"}
    assert db.load_states("live", "sensors", ["P1"]) == {}
