"""`pipeline --help` and the alerts API must not import torch: they are used by people and probes that never
score anything, and torch is most of the start-up time (measured in docs/results/bench.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HELP = """
import sys
sys.argv = ["pipeline", "--help"]
from pipeline.cli import main
try:
    main()
except SystemExit:
    pass
print("torch" in sys.modules, file=sys.stderr)
"""

API = """
import sys
from pipeline.api.app import create_app
from pipeline.config import Settings
from pipeline.sinks import AlertQueries, Database
db = Database("sqlite:///" + sys.argv[1])
db.create_schema()
create_app(AlertQueries(db), Settings(), run_id="live")
print("torch" in sys.modules, file=sys.stderr)
"""


def _imports_torch(code: str, *args: str) -> bool:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, check=True)
    return out.stderr.strip().splitlines()[-1] == "True"


def test_cli_help_does_not_import_torch() -> None:
    assert not _imports_torch(HELP)


def test_api_app_does_not_import_torch(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    assert not _imports_torch(API, str(tmp_path / "api.db"))
