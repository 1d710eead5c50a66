"""The stream file (pipeline/streams): the bundled default, strict validation whose errors name the key, the
decoder that reads a stream's own entity/time field names, and `pipeline streams check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import typer
from typer.testing import CliRunner

from models.lstm_ae import bundled_checkpoint_path
from pipeline.config import Settings
from pipeline.errors import DecodeError
from pipeline.streams.cli import register
from pipeline.streams.config import (
    ENV_VAR,
    ModelRef,
    StreamsFileError,
    bundled_streams_file,
    load_streams,
    parse_streams,
    streams_file_from_env,
)
from pipeline.streams.decode import StreamDecoder

TWO_SENSOR_STREAMS = """
[[streams]]
name = "pumps"
topic = "plant.pumps"
kind = "sensors"
entity_key = "pump_id"
time_field = "at"
model = "pumps@champion"
challenger = "pumps@challenger"
[[streams.channels]]
name = "vibration_rms"
role = "scored"
unit = "mm/s"
min = 0.0
max = 50.0
[[streams.channels]]
name = "bearing_temp"
role = "context"

[[streams]]
name = "chillers"
topic = "plant.chillers"
kind = "sensors"
entity_key = "device_id"
time_field = "timestamp"
model = "models/chillers.pt"
[[streams.channels]]
name = "supply_temp"
[[streams.channels]]
name = "return_temp"
[[streams.channels]]
name = "compressor_current"
"""

PUMPS = """
[[streams]]
name = "pumps"
topic = "plant.pumps"
kind = "sensors"
entity_key = "device_id"
time_field = "timestamp"
model = "pumps@champion"
[[streams.channels]]
name = "vibration_rms"
[[streams.channels]]
name = "bearing_temp"
role = "context"
"""


@pytest.fixture()
def plant(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "chillers.pt").write_bytes(b"")
    path = tmp_path / "plant.toml"
    path.write_text(TWO_SENSOR_STREAMS)
    return path


def test_bundled_default_is_todays_two_streams() -> None:
    """Each fact of the default file also lives in Settings and the bundled checkpoints: they must agree."""
    streams = load_streams(bundled_streams_file())
    tx, sensors = streams.stream("transactions"), streams.stream("sensors")
    settings = Settings()
    assert (tx.topic, tx.kind, tx.channels) == (settings.transactions_topic, "transactions", [])
    assert (sensors.topic, sensors.kind) == (settings.sensors_topic, "sensors")
    assert sensors.channel_names == settings.sensor_channels == sensors.scored_channels
    card = json.loads(bundled_checkpoint_path("sensors").with_suffix(".card.json").read_text())
    assert sensors.channel_names == card["feature_names"]
    assert tx.model_ref == ModelRef("bundled", "transactions") and sensors.model_ref == ModelRef("bundled", "sensors")


def test_two_sensor_streams_with_their_own_channels(plant: Path) -> None:
    streams = load_streams(plant)
    pumps, chillers = streams.streams
    assert pumps.channel_names == ["vibration_rms", "bearing_temp"] and pumps.scored_channels == ["vibration_rms"]
    assert pumps.channels[0].unit == "mm/s" and (pumps.channels[0].min, pumps.channels[0].max) == (0.0, 50.0)
    assert pumps.model_ref == ModelRef("registry", "pumps", "champion") and pumps.challenger == "pumps@challenger"
    assert chillers.scored_channels == chillers.channel_names and chillers.channels[0].role == "scored"
    # a relative model path is relative to the stream file's folder
    assert chillers.model_ref == ModelRef("path", str(plant.parent / "models" / "chillers.pt"))
    # the same file saved with a byte-order mark (as some Windows editors do) reads the same
    plant.write_bytes(b"\xef\xbb\xbf" + plant.read_bytes())
    assert load_streams(plant) == streams


def _variant(old: str, new: str, base: str = PUMPS) -> str:
    assert old in base
    return base.replace(old, new, 1)


BAD_FILES = [
    pytest.param(
        _variant('role = "context"', 'role = "score"'),
        "streams[0].channels[1].role: must be one of scored, context (got 'score')",
        id="role typo",
    ),
    pytest.param(
        _variant('kind = "sensors"', 'kind = "sensors"\nentity = "x"'),
        "streams[0].entity: unknown key (allowed: name, topic, kind,",
        id="unknown key",
    ),
    pytest.param(
        _variant('role = "context"', 'role = "context"\nunits = "C"'),
        "streams[0].channels[1].units: unknown key",
        id="unknown channel key",
    ),
    pytest.param(
        _variant('kind = "sensors"', 'kind = "pumps"'),
        "streams[0].kind: must be one of sensors, transactions (got 'pumps')",
        id="unknown kind",
    ),
    pytest.param(
        _variant('topic = "plant.pumps"\n', ""), "streams[0].topic: required key is missing", id="missing key"
    ),
    pytest.param(
        PUMPS.split("[[streams.channels]]")[0],
        "streams[0]: a sensors stream needs at least one [[streams.channels]]",
        id="no channels",
    ),
    pytest.param(
        _variant('name = "vibration_rms"', 'name = "vibration_rms"\nrole = "context"'),
        "needs at least one channel with role = 'scored'",
        id="only context",
    ),
    pytest.param(
        PUMPS + _variant('topic = "plant.pumps"', 'topic = "other"'),
        "streams[1].name: 'pumps' is already used by streams[0]",
        id="duplicate name",
    ),
    pytest.param(
        PUMPS + _variant('name = "pumps"', 'name = "other"'),
        "streams[1].topic: 'plant.pumps' is already used by streams[0]",
        id="duplicate topic",
    ),
    pytest.param(
        _variant('name = "bearing_temp"', 'name = "vibration_rms"'),
        "streams[0]: channel 'vibration_rms' is declared twice",
        id="duplicate channel",
    ),
    pytest.param(  # found by probing: 'flow' and 'FLOW' were two channels
        _variant('name = "bearing_temp"', 'name = "Vibration_RMS"'),
        "streams[0]: channel 'Vibration_RMS' is declared twice ('vibration_rms' and 'Vibration_RMS' differ only "
        "in case)",
        id="channel twice in another case",
    ),
    pytest.param(  # and ' flow' next to 'flow' was accepted
        _variant('name = "bearing_temp"', 'name = " vibration_rms"'),
        "streams[0].channels[1].name: must not begin or end with a space (got ' vibration_rms')",
        id="channel with a leading space",
    ),
    pytest.param(
        _variant('role = "context"', 'role = "context"\nmin = 5.0\nmax = 1.0'),
        "streams[0].channels[1]: min must be below max (got min=5.0, max=1.0)",
        id="range",
    ),
    pytest.param(
        _variant('name = "pumps"', 'name = "Pumps 1"'),
        "streams[0].name: must be 1-64 characters of a-z, 0-9, _ and - (got 'Pumps 1')",
        id="name pattern",
    ),
    pytest.param(
        _variant('topic = "plant.pumps"', 'topic = "plant pumps"'),
        "streams[0].topic: must be a Kafka topic name",
        id="topic pattern",
    ),
    pytest.param(
        _variant('topic = "plant.pumps"', "topic = 7"),
        "streams[0].topic: input should be a valid string (got 7)",
        id="wrong type",
    ),
    pytest.param(
        _variant('model = "pumps@champion"', 'model = "pumps"'),
        "streams[0].model: must be NAME@ALIAS or a version id NAME-vN (registry), a path to a .pt file, "
        "or bundled:KIND (got 'pumps')",
        id="model ref",
    ),
    pytest.param(
        _variant('model = "pumps@champion"', 'model = "nowhere/pumps.pt"'),
        "streams[0].model: no model file at",
        id="missing model file",
    ),
    pytest.param(
        _variant('model = "pumps@champion"', 'model = "bundled:transactions"'),
        "streams[0]: model 'bundled:transactions' is the bundled transactions model; this stream is sensors",
        id="bundled of the other kind",
    ),
    pytest.param(
        _variant('entity_key = "device_id"', 'entity_key = "bearing_temp"'),
        "streams[0]: channel 'bearing_temp' has the name of the entity_key or time_field",
        id="entity is a channel",
    ),
    pytest.param(
        _variant('kind = "sensors"', 'kind = "transactions"'),
        "streams[0]: a transactions stream's channels are the transactions model's features",
        id="transactions channels",
    ),
    pytest.param(
        _variant('kind = "sensors"', 'kind = "sensors"\ncontext_gap_s = 0'),
        "streams[0].context_gap_s: input should be greater than 0",
        id="context gap",
    ),
    pytest.param("", "streams: required key is missing", id="no streams"),
    pytest.param("streams = []", "streams: declare at least one [[streams]]", id="empty streams"),
    pytest.param("[[streams]\nname =", "not valid TOML", id="not TOML"),
]


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_a_bad_file_gets_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "streams.toml"
    path.write_text(text)
    with pytest.raises(StreamsFileError) as err:
        load_streams(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(StreamsFileError, match="no such file"):
        load_streams(tmp_path / "absent.toml")
    with pytest.raises(StreamsFileError, match="stream files are TOML"):
        load_streams(tmp_path / "streams.yaml")


def test_transactions_stream_accepts_only_the_models_features() -> None:
    base = _variant('kind = "sensors"', 'kind = "transactions"').split("[[streams.channels]]")[0]
    assert parse_streams(base).streams[0].channels == []
    names = ["log_amount", "log_seconds_since_prev", "hour_sin", "hour_cos", "dow_sin", "dow_cos"]
    listed = base + "".join(f'[[streams.channels]]\nname = "{n}"\n' for n in names)
    assert parse_streams(listed).streams[0].channel_names == names


def test_stream_file_from_the_environment(monkeypatch: pytest.MonkeyPatch, plant: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert streams_file_from_env() == bundled_streams_file()
    monkeypatch.setenv(ENV_VAR, str(plant))
    assert streams_file_from_env() == plant


def test_decoder_reads_the_streams_own_field_names(plant: Path) -> None:
    pumps = load_streams(plant).stream("pumps")
    decoder = StreamDecoder(pumps)
    rec = decoder.decode(
        orjson.dumps(
            {"pump_id": "P1", "at": "2024-05-01T00:00:00Z", "values": {"vibration_rms": 1.5, "bearing_temp": 60}}
        )
    )
    assert decoder.spec.entity_of(rec) == "P1" and rec.values["bearing_temp"] == 60.0
    bad = {
        b'{"pump_id": "P1", "at": "2024-05-01T00:00:00Z", "values": {"vibration_rms": 1.5}}': "missing_channels",
        b'{"device_id": "P1", "pump_id": "P1", "at": "2024-05-01T00:00:00Z", "values": {}}': "schema_violation",
        b'{"pump_id": "P1", "pump_id": "P2"}': "duplicate_key",
        b"[1, 2]": "malformed_json",
        b"{": "malformed_json",
    }
    for value, reason in bad.items():
        with pytest.raises(DecodeError) as err:
            decoder.decode(value)
        assert err.value.reason == reason, value
    # details name the fields as this stream's producers write them (a probe read "customer_id: Field required"
    # for a payment stream keyed by card_id)
    details = {
        b'{"at": "2024-05-01T00:00:00Z", "values": {"vibration_rms": 1.5, "bearing_temp": 60}}': "pump_id: Field",
        b'{"pump_id": "P1", "at": "2024-05-01T00:00:00", "values": {"vibration_rms": 1.5}}': "at: ",
    }
    for value, detail in details.items():
        with pytest.raises(DecodeError) as err:
            decoder.decode(value)
        assert err.value.detail.startswith(detail), err.value.detail


def test_streams_check_prints_one_line_per_stream(plant: Path) -> None:
    plant.write_text(plant.read_text().replace('model = "models/chillers.pt"', 'model = "chillers@champion"'))
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["streams", "check", str(plant)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "pumps: topic plant.pumps, sensors, entity pump_id, time at, 2 channels (1 scored, 1 context), "
        "model pumps@champion, challenger pumps@challenger",
        "chillers: topic plant.chillers, sensors, entity device_id, time timestamp, 3 channels (3 scored, 0 context), "
        "model chillers@champion",
    ]


def test_streams_check_loads_a_model_named_by_file_as_run_does(plant: Path) -> None:
    """A probe's stream served by `bundled:sensors` with other channels passed `streams check`, and `pipeline
    run` refused it; a model named by file (a path, bundled:KIND) is now checked here (registry models are
    checked by `models promote` and at start, where the database is)."""
    app = typer.Typer()
    register(app)
    unreadable = CliRunner().invoke(app, ["streams", "check", str(plant)])  # the fixture's chillers.pt is empty
    assert unreadable.exit_code == 2 and "stream 'chillers': model" in unreadable.output
    assert "cannot load" in unreadable.output
    plant.write_text(plant.read_text().replace('model = "models/chillers.pt"', 'model = "bundled:sensors"'))
    other = CliRunner().invoke(app, ["streams", "check", str(plant)])
    assert other.exit_code == 2 and "stream 'chillers' cannot be served by model" in other.output


def test_streams_check_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    """Through the installed entry point (pipeline.cli.main): no traceback, one line on stderr."""
    path = tmp_path / "bad.toml"
    path.write_text(_variant('role = "context"', 'role = "score"'))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "streams", "check", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {path}: streams[0].channels[1].role: must be one of scored, context (got 'score')"
    ]


@pytest.mark.parametrize("topic, env, words", [
    ("dead-letter", {}, "topic 'dead-letter' is PIPELINE_DLQ_TOPIC: each dead letter would be read back"),
    ("plant.dlq", {"PIPELINE_DLQ_TOPIC": "plant.dlq"}, "topic 'plant.dlq' is PIPELINE_DLQ_TOPIC"),
    ("alerts", {}, "topic 'alerts' is PIPELINE_ALERTS_TOPIC: the service writes its alerts there"),
])  # fmt: skip
def test_streams_check_refuses_a_topic_the_service_writes(
    tmp_path: Path, topic: str, env: dict[str, str], words: str
) -> None:
    """`streams check` passed a stream on the dead-letter topic, which `pipeline run` then refused at start."""
    path = tmp_path / "plant.toml"
    path.write_text(_variant('topic = "plant.pumps"', f'topic = "{topic}"'))
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["streams", "check", str(path)], env=env)
    assert result.exit_code == 2 and f"error: stream 'pumps': {words}" in result.output
