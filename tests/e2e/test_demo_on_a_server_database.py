"""`pipeline demo --database-url postgresql://...` wrote its simulated alerts and positions into that database's
live run, and summarised that run's older alerts as its own (found by probing, 2026-12-01). It now writes under
a run id of its own. The real command, embedded broker, real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.alerts_seed import seed
from tests.sql_helpers import SqlTestStore


def test_the_demo_leaves_a_server_databases_live_run_alone(pg_store: SqlTestStore, pg_url: str, tmp_path: Path) -> None:
    seed(pg_store, run_id="live")
    live_before = pg_store.count_alerts("live")
    groups_before = pg_store.position_groups("live")
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP"}  # the demo's own embedded broker
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--database-url", pg_url, "--customers", "60", "--devices", "6"],
        env={**env, "PIPELINE_TORCH_THREADS": "1", "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ", run demo-" in done.stdout
    assert pg_store.count_alerts("live") == live_before and pg_store.position_groups("live") == groups_before
    demo_runs = [r for r in pg_store.list_alerts(limit=10_000) if r["run_id"].startswith("demo-")]
    assert demo_runs, "the demo's alerts are under its own run id"
