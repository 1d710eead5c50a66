"""A plant's own streams end to end, as the README walks through them: a stream file with two sensor streams of
different channel sets and entity keys, a model for each trained by `pipeline train --stream` on a CSV export
(pumps: registered and promoted, served as pumps@champion; chillers: a checkpoint file next to the stream file),
then `pipeline run` with PIPELINE_STREAMS_FILE on the real broker and PostgreSQL. Both streams use the same
entity ids, so any state shared between them would show."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import text

from tests.service_helpers import REPO, produce, run_processor, topic_env
from tests.sql_helpers import SqlTestStore

UNITS = [f"unit-{i}" for i in range(1, 5)]
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
HISTORY, LIVE = 400, 240  # readings per unit: the CSV export, then the live stream
FAULT_AT, FAULT_LEN = 200, 6  # live readings of the faulty unit with an injected fault


class Plant:
    """Two device types: channel sets, field names and the faulty unit of each."""

    streams = {
        "pumps": {"entity": "pump_id", "time": "at", "channels": ["flow", "pressure", "vibration"]},
        "chillers": {
            "entity": "chiller",
            "time": "ts",
            "channels": ["supply_temp", "return_temp", "current", "condenser_pressure", "oil_temp"],
        },
    }
    faulty = {"pumps": ("unit-2", "vibration"), "chillers": ("unit-3", "oil_temp")}


def reading(stream: str, unit: int, i: int, rng: np.random.Generator, fault: bool = False) -> dict[str, Any]:
    spec = Plant.streams[stream]
    values = {
        c: 10.0 * (j + 1) + math.sin(i / (4.0 + j) + unit) + 0.05 * float(rng.standard_normal())
        for j, c in enumerate(spec["channels"])
    }
    if fault:
        values[Plant.faulty[stream][1]] += 25.0
    return {spec["entity"]: UNITS[unit], spec["time"]: (T0 + timedelta(seconds=30 * i)).isoformat(), "values": values}


def write_history(stream: str, path: Path) -> Path:
    spec = Plant.streams[stream]
    rng = np.random.default_rng(1)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([spec["entity"], spec["time"], *spec["channels"]])
        for u in range(len(UNITS)):
            for i in range(HISTORY):
                r = reading(stream, u, i, rng)
                out.writerow([r[spec["entity"]], r[spec["time"]], *(r["values"][c] for c in spec["channels"])])
    return path


def write_stream_file(folder: Path, prefix: str) -> Path:
    models = {"pumps": "pumps@champion", "chillers": "models/chillers.pt"}
    parts = []
    for name, spec in Plant.streams.items():
        parts.append(
            f'[[streams]]\nname = "{name}"\ntopic = "{prefix}.{name}"\nkind = "sensors"\n'
            f'entity_key = "{spec["entity"]}"\ntime_field = "{spec["time"]}"\nmodel = "{models[name]}"\n'
            + "".join(f'[[streams.channels]]\nname = "{c}"\n' for c in spec["channels"])
        )
    path = folder / "plant.toml"
    path.write_text("\n".join(parts))
    return path


def pipeline_cli(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"pipeline {' '.join(args)}: {done.stderr[-3000:]}"
    return done.stdout


def entity_states(store: SqlTestStore) -> dict[str, set[str]]:
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT stream, entity_id FROM entity_state WHERE run_id = 'live'")).all()
    out: dict[str, set[str]] = {}
    for r in rows:  # sensor streams keep no partition-level rows (terminal context, dedupe window)
        out.setdefault(r.stream, set()).add(r.entity_id)
    return out


def test_two_sensor_streams_of_a_stream_file_each_with_its_own_model_and_state(
    kafka_bootstrap: str, pg_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    env = {**topic_env(topic_prefix, kafka_bootstrap, pg_store.url), "PIPELINE_STREAMS_FILE": ""}
    streams_file = write_stream_file(tmp_path, topic_prefix)
    (tmp_path / "models").mkdir()
    train = ["train", "--streams-file", str(streams_file), "--epochs", "2"]
    out = pipeline_cli(
        *train,
        "--stream",
        "pumps",
        "--data",
        str(write_history("pumps", tmp_path / "pumps.csv")),
        "--out",
        str(tmp_path / "registered"),
        "--register",
        "--database-url",
        pg_store.url,
        env=env,
    )
    pumps_version = out.split("registered as ")[1].split()[0]
    pipeline_cli("models", "promote", pumps_version, "--stream", "pumps", "--streams-file", str(streams_file), env=env)
    out = pipeline_cli(
        *train,
        "--stream",
        "chillers",
        "--family",
        "lstm_ae",
        "--data",
        str(write_history("chillers", tmp_path / "chillers.csv")),
        "--out",
        str(tmp_path / "models"),
        env=env,
    )
    chillers_version = json.loads((tmp_path / "models" / "chillers.card.json").read_text())["version"]
    assert pumps_version == "pumps-v1" and chillers_version.startswith("chillers-lstm-ae@")

    rng = np.random.default_rng(2)
    for name, spec in Plant.streams.items():
        unit, _channel = Plant.faulty[name]
        live = [
            reading(name, u, HISTORY + i, rng, fault=UNITS[u] == unit and FAULT_AT <= i < FAULT_AT + FAULT_LEN)
            for i in range(LIVE)
            for u in range(len(UNITS))
        ]
        produce(kafka_bootstrap, f"{topic_prefix}.{name}", ((r[spec["entity"]], r) for r in live))
    run_processor({**env, "PIPELINE_STREAMS_FILE": str(streams_file)}, log_path=tmp_path / "proc.log")

    alerts = pg_store.list_alerts(run_id="live")
    versions = {"pumps": pumps_version, "chillers": chillers_version}
    for name in Plant.streams:
        mine = [a for a in alerts if a["stream"] == name]
        unit, channel = Plant.faulty[name]
        assert {a["model_version"] for a in mine} == {versions[name]}, name
        assert {a["source_topic"] for a in mine} == {f"{topic_prefix}.{name}"}
        faults = [a for a in mine if a["entity_id"] == unit]
        assert faults, f"{name}: the fault of {unit} was not caught"
        assert faults[0]["top_features"][0]["feature"] == channel
        assert len(mine) <= 2 * FAULT_LEN + 4, f"{name}: {len(mine)} alerts for one fault of {FAULT_LEN} readings"
    # the faulty pump is a healthy chiller and vice versa: each stream's alerts name only its own fault
    assert {a["entity_id"] for a in alerts if a["stream"] == "pumps"} <= {Plant.faulty["pumps"][0]}
    assert {a["entity_id"] for a in alerts if a["stream"] == "chillers"} <= {Plant.faulty["chillers"][0]}
    assert entity_states(pg_store) == {"pumps": set(UNITS), "chillers": set(UNITS)}
