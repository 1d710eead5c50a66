"""Options with a range refuse values outside it before anything starts: a usage error naming the option,
exit 2, never a traceback or a run that silently does nothing (found by probing: `bench --events -5` ran a
benchmark, `run --max-events -1` consumed nothing and exited 0, `api --port 99999` raised OverflowError)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from pipeline import cli
from pipeline.alerts.cli import register as register_alerts
from pipeline.api.cli import register as register_api
from pipeline.bench.cli import register as register_bench
from pipeline.evaluate.cli import register as register_evaluate


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
    import subprocess
    import sys
    import time

    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "alerts", "tail", "--bootstrap", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "following alerts on 127.0.0.1:1" in done.stderr
    assert "no broker at 127.0.0.1:1" in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - t0 < 25
