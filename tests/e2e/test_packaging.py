"""`pip install .` must carry everything the service needs: bundled checkpoints and cards, JSON schemas,
migrations and web assets. Build the wheel, install it into a private target, use it from outside the repo."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"wheel build failed:\n{proc.stdout}\n{proc.stderr}")
    return next(out.glob("*.whl"))


def test_wheel_contains_data_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("models/checkpoints/transactions.pt", "models/checkpoints/sensors.pt",
                     "models/checkpoints/transactions.card.json", "schemas/alert.schema.json",
                     "schemas/transaction.schema.json", "schemas/transaction_label.schema.json",
                     "schemas/sensor_reading.schema.json",
                     "pipeline/py.typed"):
        assert required in names, required
    assert not any(n.startswith("tests/") for n in names)


def test_installed_package_works_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = (
        "import sys, models, pipeline, schemas\n"
        "assert pipeline.__file__.startswith(sys.argv[1]), pipeline.__file__\n"
        "from schemas import load_schema\n"
        "from models import bundled_checkpoint_path, load_checkpoint\n"
        "for s in ('transaction', 'sensor_reading', 'alert'): load_schema(s)\n"
        "for s in ('transactions', 'sensors'):\n"
        "    c = load_checkpoint(bundled_checkpoint_path(s)); assert c.threshold > 0\n"
        "from pipeline.sinks.sql import SqlStore\n"
        "st = SqlStore('sqlite:///' + sys.argv[2]); st.create_schema(); assert st.list_alerts() == []\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code, str(target), str(tmp_path / "a.db")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
