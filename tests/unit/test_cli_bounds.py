"""Options with a range refuse values outside it before anything starts: a usage error naming the option,
exit 2, never a traceback or a run that silently does nothing (found by probing: `bench --events -5` ran a
benchmark, `run --max-events -1` consumed nothing and exited 0, `api --port 99999` raised OverflowError)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline import cli
from pipeline.alerts.cli import register as register_alerts
from pipeline.api.cli import register as register_api
from pipeline.bench.cli import register as register_bench
from pipeline.evaluate.cli import register as register_evaluate
from tests.service_helpers import run_cli


def _app_with(register: object) -> typer.Typer:
    app = typer.Typer()
    register(app)  # type: ignore[operator]
    return app


@pytest.mark.parametrize(
    ("app", "args"),
    [
        (_app_with(register_bench), ["bench", "--events", "-5"]),
        (_app_with(register_bench), ["bench", "--entities", "0"]),
        (_app_with(register_bench), ["bench", "--batch", "0"]),
        (_app_with(register_bench), ["bench", "--rate", "-1"]),
        (_app_with(register_api), ["api", "--port", "99999"]),
        (_app_with(register_alerts), ["alerts", "list", "--limit", "-1"]),
        (cli.app, ["run", "--max-events", "-1"]),
        (cli.app, ["run", "--idle-exit", "-2"]),
        (cli.app, ["run", "--api-port", "70000"]),
        (cli.app, ["produce", "--entities", "0"]),
        (cli.app, ["broker", "--port", "0"]),
        (cli.app, ["demo", "--devices", "0"]),
        (cli.app, ["train", "--epochs", "0"]),
        # found by probing on 2026-12-01: each of these was a traceback (or, evaluate --epochs 0, a run that
        # trained nothing and printed metrics)
        (cli.app, ["train", "--seed", "-5"]),
        (cli.app, ["train", "--seed", "99999999999999999999"]),
        (cli.app, ["produce", "--seed", "-1"]),
        # --anomalous above --entities was capped without a word
        (cli.app, ["produce", "sensors", "--bootstrap", "127.0.0.1:1", "--entities", "2", "--anomalous", "5"]),
        (_app_with(register_evaluate), ["evaluate", "--format", "skab", "--data", ".", "--epochs", "0"]),
        (_app_with(register_evaluate), ["evaluate", "--format", "skab", "--data", ".", "--seed", "-1"]),
        (_app_with(register_evaluate), ["evaluate", "--format", "skab", "--data", ".", "--device", "bogus"]),
        (_app_with(register_alerts), ["alerts", "list", "--limit", "99999999999999999999"]),
        (_app_with(register_alerts), ["alerts", "ack", "99999999999999999999"]),
        (_app_with(register_alerts), ["alerts", "label", "99999999999999999999", "--tp"]),
    ],
)
def test_out_of_range_options_are_usage_errors(app: typer.Typer, args: list[str]) -> None:
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    option = args[-2] if args[-2].startswith("--") else "ID"  # the value refused comes last (or is the ID)
    assert res.exit_code == 2 and "Invalid value" in res.output and option in res.output, res.output


def test_alerts_tail_without_a_broker_says_so_within_seconds() -> None:
    """It was silent for kafka-python 3's 30 s bootstrap timeout (found by probing, 2026-12-01)."""
    import time

    t0 = time.monotonic()
    done = run_cli("alerts", "tail", "--bootstrap", "127.0.0.1:1")
    assert done.returncode == 2 and "following alerts on 127.0.0.1:1" in done.stderr
    assert "no broker at 127.0.0.1:1" in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - t0 < 25


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PIPELINE_PRECISION": "fp64"}, "PIPELINE_PRECISION: Input should be 'fp32', 'bf16' or 'int8' (got 'fp64')"),
        ({"PIPELINE_MAX_BATCH_RECORDS": "0"}, "PIPELINE_MAX_BATCH_RECORDS: Input should be greater than or equal to 1"),
        ({"PIPELINE_MAX_MESSAGE_BYTES": "-1"}, "PIPELINE_MAX_MESSAGE_BYTES: Input should be greater than or equal to"),
        ({"PIPELINE_SNAPSHOT_INTERVAL_S": "nan"}, "PIPELINE_SNAPSHOT_INTERVAL_S: Input should be a finite number"),
        ({"PIPELINE_THRESHOLD_Z": "-1"}, "PIPELINE_THRESHOLD_Z: z must be a finite number of standard deviations >= 0"),
        ({"PIPELINE_THRESHOLD_SMOOTHING": "0"}, "PIPELINE_THRESHOLD_SMOOTHING: smoothing must be in (0, 1]"),
        ({"PIPELINE_ALERTS_RESOLVE_AFTER": "0"}, "PIPELINE_ALERTS_RESOLVE_AFTER: Input should be greater than"),
        ({"PIPELINE_SENSORS_TOPIC": "bad topic!"}, "PIPELINE_SENSORS_TOPIC: String should match pattern"),
        ({"PIPELINE_LOG_LEVEL": "LOUD"}, "PIPELINE_LOG_LEVEL: Input should be 'DEBUG', 'INFO'"),
        ({"PIPELINE_HEARTBEAT_INTERVAL_MS": "7000"}, "PIPELINE_HEARTBEAT_INTERVAL_MS (7000) must be below"),
        ({"PIPELINE_DLQ_TOPIC": "sensor-readings"}, "PIPELINE_DLQ_TOPIC 'sensor-readings' is also an input topic"),
        ({"PIPELINE_SENSOR_CHANNELS": "notjson"}, "error: PIPELINE_SENSOR_CHANNELS: cannot be parsed; list settings"),
        # found by probing the service under faults (2026-12-01, second probe): tracebacks once records came
        # (islice), at start (kafka-python's request timeout), a run that wedged on PostgreSQL's VARCHAR(64),
        # an embedded broker started for an empty KAFKA_BOOTSTRAP, and one stream silently winning a topic
        ({"PIPELINE_MAX_BATCH_RECORDS": "99999999999999999999"}, "PIPELINE_MAX_BATCH_RECORDS: Input should be less"),
        ({"PIPELINE_FETCH_MAX_WAIT_MS": "30000"}, "PIPELINE_FETCH_MAX_WAIT_MS: Input should be less than or equal"),
        ({"PIPELINE_RUN_ID": "r" * 80}, "PIPELINE_RUN_ID: a run id is 1-64 characters without spaces"),
        ({"PIPELINE_GROUP_ID": ""}, "PIPELINE_GROUP_ID: String should match pattern"),
        ({"KAFKA_BOOTSTRAP": ""}, "KAFKA_BOOTSTRAP: String should have at least 1 character (got '')"),
        ({"PIPELINE_SENSORS_TOPIC": "transactions"}, "PIPELINE_TRANSACTIONS_TOPIC and PIPELINE_SENSORS_TOPIC are both"),
        ({"PIPELINE_SENSOR_CHANNELS": '["a", "a"]'}, "PIPELINE_SENSOR_CHANNELS names a channel twice"),
    ],
)
def test_a_bad_setting_stops_the_command_with_one_line_naming_it(env: dict[str, str], message: str) -> None:
    """Found by probing (2026-12-01): each was a pydantic or Kafka traceback, or a run that dead-lettered every
    record (max message bytes 0) or never consumed."""
    import os

    done = run_cli("run", "--idle-exit", "1", env={**os.environ, "COLUMNS": "300", **env})
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (done.stdout, done.stderr)
    assert message in lines[0]


def test_a_models_dir_that_does_not_exist_is_an_error_not_stand_in_models(tmp_path: Path) -> None:
    """It trained small default models on simulated traffic and served them (found by probing, 2026-12-01)."""
    import os

    env = {
        **os.environ,
        "PIPELINE_MODELS_DIR": str(tmp_path / "modles"),
        "KAFKA_BOOTSTRAP": "127.0.0.1:1",  # never reached: the models are checked first
        "DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
        "COLUMNS": "300",
    }
    done = run_cli("run", "--idle-exit", "1", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"PIPELINE_MODELS_DIR {tmp_path / 'modles'}: no such folder" in done.stdout + done.stderr
    assert not (tmp_path / "modles").exists()


def test_a_models_dir_with_one_streams_model_keeps_it_and_trains_only_the_other(tmp_path: Path) -> None:
    """A probe: `evaluate --save-model DIR/transactions.pt`, then `run` with PIPELINE_MODELS_DIR=DIR, logged "no
    checkpoints" and overwrote the saved payments model with a default one (the sensors model was missing)."""
    import shutil

    from models.lstm_ae import bundled_checkpoint_path
    from pipeline.app import ensure_models
    from pipeline.config import Settings

    saved = bundled_checkpoint_path("transactions")
    for f in (saved, saved.with_name("transactions.card.json")):
        shutil.copy(f, tmp_path / f.name)
    before = (tmp_path / "transactions.pt").read_bytes()
    models = ensure_models(Settings(models_dir=tmp_path))
    assert (tmp_path / "transactions.pt").read_bytes() == before  # kept, byte for byte
    assert (tmp_path / "sensors.pt").exists() and models["sensors"].card["stream"] == "sensors"


def test_the_demo_never_deletes_a_database_it_did_not_create(tmp_path: Path) -> None:
    """`demo --database-url sqlite:///X` deleted X first, whatever it held (found by probing, 2026-12-01)."""
    precious = tmp_path / "alerts.db"
    precious.write_bytes(b"a production database")
    done = run_cli("demo", "--database-url", f"sqlite:///{precious}")
    assert done.returncode == 2 and f"--database-url {precious}: exists" in done.stdout + done.stderr
    assert precious.read_bytes() == b"a production database"


def test_a_pipeline_variable_that_names_no_setting_is_named_with_the_closest_one() -> None:
    """A typo (PIPELINE_MAX_BATCH_RECORD) was ignored without a word; `_settings` logs each of these."""
    from pipeline.config import unknown_variables

    env = {
        "PIPELINE_MAX_BATCH_RECORD": "10",
        "PIPELINE_THRESHOLD_Z": "3",
        "PIPELINE_ALERTS_RESOLVE_AFTER": "2",
        "PIPELINE_ALERTS_TOPIC": "a",
        "PIPELINE_QWERTY": "1",
        "KAFKA_BOOTSTRAP": "b:9092",
        "HOME": "/root",
    }
    assert unknown_variables(env) == [
        "PIPELINE_MAX_BATCH_RECORD (did you mean PIPELINE_MAX_BATCH_RECORDS?)",
        "PIPELINE_QWERTY",
    ]


def test_a_typo_in_the_env_file_is_named_too(tmp_path: Path) -> None:
    """Settings come from the environment or a `.env` file; a misspelt name in the file was ignored without a
    word (the check read the environment only)."""
    (tmp_path / ".env").write_text("PIPELINE_MAX_BATCH_RECORD=5\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "streams", "check"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "PIPELINE_MAX_BATCH_RECORD (did you mean PIPELINE_MAX_BATCH_RECORDS?) is not a setting" in done.stderr


def test_a_topic_clash_stops_run_before_a_database_is_created(tmp_path: Path) -> None:
    """`PIPELINE_ALERTS_TOPIC=sensor-readings` was refused only after the database had been created and
    migrated (20 log lines, a new file); the README says a bad setting stops the command before it starts."""
    db = tmp_path / "fresh.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env |= {
        "DATABASE_URL": f"sqlite:///{db}",
        "PIPELINE_ALERTS_TOPIC": "sensor-readings",
        "KAFKA_BOOTSTRAP": "127.0.0.1:1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--max-events", "1"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "topic 'sensor-readings' is PIPELINE_ALERTS_TOPIC" in done.stderr, done.stderr
    assert not db.exists() and "alembic" not in done.stderr.lower()
