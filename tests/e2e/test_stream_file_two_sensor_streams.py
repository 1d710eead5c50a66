"""A plant's own streams end to end, as the README walks through them: a stream file with two sensor streams of
different channel sets and entity keys, a model for each trained by `pipeline train --stream` on a CSV export
(pumps: registered and promoted, served as pumps@champion; chillers: a checkpoint file next to the stream file),
then `pipeline run` with PIPELINE_STREAMS_FILE on the real broker and PostgreSQL. Both streams use the same
entity ids, so any state shared between them would show. Then `pipeline replay` of both topics through the same
stream file reproduces the live alerts, and a replay with a model whose channels differ is refused."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import dataclass
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
FAULT_AT = 200
FAULT_STEPS = range(FAULT_AT, FAULT_AT + 6)  # live readings of the faulty unit with an injected fault


@dataclass(frozen=True)
class DeviceType:
    entity: str  # the records' entity field ...
    time: str  # ... and time field
    channels: list[str]
    faulty_unit: str
    fault_channel: str


PLANT = {
    "pumps": DeviceType("pump_id", "at", ["flow", "pressure", "vibration"], "unit-2", "vibration"),
    "chillers": DeviceType(
        "chiller",
        "ts",
        ["supply_temp", "return_temp", "current", "condenser_pressure", "oil_temp"],
        "unit-3",
        "oil_temp",
    ),
}


def reading(stream: str, unit: int, i: int, rng: np.random.Generator, fault: bool = False) -> dict[str, Any]:
    device = PLANT[stream]
    values = {
        c: 10.0 * (j + 1) + math.sin(i / (4.0 + j) + unit) + 0.05 * float(rng.standard_normal())
        for j, c in enumerate(device.channels)
    }
    if fault:
        values[device.fault_channel] += 25.0
    return {device.entity: UNITS[unit], device.time: (T0 + timedelta(seconds=30 * i)).isoformat(), "values": values}


def write_history(stream: str, path: Path) -> Path:
    device = PLANT[stream]
    rng = np.random.default_rng(1)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([device.entity, device.time, *device.channels])
        for u in range(len(UNITS)):
            for i in range(HISTORY):
                r = reading(stream, u, i, rng)
                out.writerow([r[device.entity], r[device.time], *(r["values"][c] for c in device.channels)])
    return path


def write_stream_file(folder: Path, prefix: str, chillers_model: str) -> Path:
    models = {"pumps": "pumps@champion", "chillers": chillers_model}
    parts = []
    for name, device in PLANT.items():
        parts.append(
            f'[[streams]]\nname = "{name}"\ntopic = "{prefix}.{name}"\nkind = "sensors"\n'
            f'entity_key = "{device.entity}"\ntime_field = "{device.time}"\nmodel = "{models[name]}"\n'
            + "".join(f'[[streams.channels]]\nname = "{c}"\n' for c in device.channels)
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
    for r in rows:  # a partition's rows ('#dedupe:P', the readings' dedupe window) are no entity
        if not r.entity_id.startswith("#"):
            out.setdefault(r.stream, set()).add(r.entity_id)
    return out


def test_two_sensor_streams_of_a_stream_file_each_with_its_own_model_and_state(
    kafka_bootstrap: str, pg_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    env = {**topic_env(topic_prefix, kafka_bootstrap, pg_store.url), "PIPELINE_STREAMS_FILE": ""}
    # a model file named by the stream file must exist: chillers name theirs once it is trained
    streams_file = write_stream_file(tmp_path, topic_prefix, chillers_model="chillers@champion")
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
    write_stream_file(tmp_path, topic_prefix, chillers_model="models/chillers.pt")

    rng = np.random.default_rng(2)
    for name, device in PLANT.items():
        live = [
            reading(name, u, HISTORY + i, rng, fault=UNITS[u] == device.faulty_unit and i in FAULT_STEPS)
            for i in range(LIVE)
            for u in range(len(UNITS))
        ]
        produce(kafka_bootstrap, f"{topic_prefix}.{name}", ((r[device.entity], r) for r in live))
    run_processor({**env, "PIPELINE_STREAMS_FILE": str(streams_file)}, log_path=tmp_path / "proc.log")

    alerts = pg_store.list_alerts(run_id="live")
    versions = {"pumps": pumps_version, "chillers": chillers_version}
    fault_start = T0 + timedelta(seconds=30 * (HISTORY + FAULT_AT))
    for name, device in PLANT.items():
        mine = [a for a in alerts if a["stream"] == name]
        assert {a["model_version"] for a in mine} == {versions[name]}, name
        assert {a["source_topic"] for a in mine} == {f"{topic_prefix}.{name}"}
        unit = device.faulty_unit
        caught = [a for a in mine if a["entity_id"] == unit and a["event_time"] >= fault_start]
        assert caught, f"{name}: the fault of {unit} was not caught"
        assert caught[0]["event_time"] == fault_start
        assert caught[0]["top_features"][0]["feature"] == device.fault_channel
        others = [a for a in mine if a["entity_id"] != unit]
        assert len(others) <= 2, (
            f"{name}: alerts on healthy units {[(a['entity_id'], a['event_time']) for a in others]}"
        )
        # the other stream's faulty unit is healthy here: its fault must not leak into this stream's state
        other_unit = next(d.faulty_unit for s, d in PLANT.items() if s != name)
        assert not [a for a in mine if a["entity_id"] == other_unit and a["event_time"] >= fault_start], name
    assert entity_states(pg_store) == {"pumps": set(UNITS), "chillers": set(UNITS)}

    # history replayed through the same stream file: the declared streams, their models, the live alerts
    served_env = {**env, "PIPELINE_STREAMS_FILE": str(streams_file)}
    topics = [f"{topic_prefix}.{name}" for name in PLANT]
    out = pipeline_cli(
        "replay", *(a for t in topics for a in ("--topic", t)), "--run-id", "replay-a", "--json", env=served_env
    )
    assert json.loads(out)["model_versions"] == {f"{topic_prefix}.{n}": v for n, v in versions.items()}

    def keyed(run_id: str) -> set[tuple[Any, ...]]:
        return {
            (
                a["stream"],
                a["entity_id"],
                a["source_topic"],
                a["source_offset"],
                a["model_version"],
                round(a["score"], 3),
            )
            for a in pg_store.list_alerts(run_id=run_id)
        }

    assert keyed("replay-a") == keyed("live") and keyed("live")
    # a model that does not fit the stream is refused with both channel lists, nothing replayed
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "replay",
            "--topic",
            topics[0],
            "--model",
            str(tmp_path / "models" / "chillers.pt"),
            "--run-id",
            "replay-b",
        ],
        env=served_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "stream 'pumps' cannot be served" in refused.stderr and "flow, pressure, vibration" in refused.stderr
    assert not pg_store.list_alerts(run_id="replay-b")
