"""`pip install .` must carry everything the service needs: bundled checkpoints and cards, JSON schemas,
migrations and web assets. Build the wheel, install it into a private target, use it from outside the repo.
With no extras it must pull none of the optional stacks (River, faust, the API, pandas/scikit-learn), and
`pipeline --help` and `pipeline run` must work with it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"wheel build failed:\n{proc.stdout}\n{proc.stderr}")
    return next(out.glob("*.whl"))


def test_wheel_contains_data_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "models/checkpoints/transactions.pt",
        "models/checkpoints/sensors.pt",
        "models/checkpoints/transactions.card.json",
        "schemas/alert.schema.json",
        "schemas/transaction.schema.json",
        "schemas/transaction_label.schema.json",
        "schemas/sensor_reading.schema.json",
        "pipeline/py.typed",
    ):
        assert required in names, required
    assert not any(n.startswith("tests/") for n in names)


def _folders_named_like_the_packages(cwd: Path) -> None:
    """A user's working directory often holds a models/ folder (checkpoints): a folder without __init__.py
    there must not become the `models` (or `pipeline`, `schemas`) package as a namespace package."""
    for name in ("models", "pipeline", "schemas"):
        (cwd / name).mkdir()
        (cwd / name / "sensors.pt").write_bytes(b"not a package")


def test_installed_package_works_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    _folders_named_like_the_packages(tmp_path)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    code = (
        "import sys, models, pipeline, schemas\n"
        "for m in (models, pipeline, schemas): assert (m.__file__ or '').startswith(sys.argv[1]), m.__path__\n"
        "from schemas import load_schema\n"
        "from models import bundled_checkpoint_path, load_checkpoint\n"
        "for s in ('transaction', 'sensor_reading', 'alert'): load_schema(s)\n"
        "for s in ('transactions', 'sensors'):\n"
        "    c = load_checkpoint(bundled_checkpoint_path(s)); assert c.threshold > 0\n"
        "from pipeline.sinks import AlertQueries, Database\n"
        "db = Database('sqlite:///' + sys.argv[2]); db.create_schema(); assert AlertQueries(db).list_alerts() == []\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(target), str(tmp_path / "a.db")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_python_m_pipeline_runs_from_a_directory_holding_a_models_folder(tmp_path: Path) -> None:
    """The environment the tests run in (the dev venv: an editable install, `make venv`): `python -m pipeline`
    puts the working directory first on sys.path, and an editable install's import hook comes after it."""
    _folders_named_like_the_packages(tmp_path)
    code = "import models, pipeline, schemas\nprint([m.__file__ for m in (models, pipeline, schemas)])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "None" not in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "streams", "check", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


OPTIONAL = ("river", "faust", "fastapi", "uvicorn", "pandas", "sklearn", "tep_studio")


def _runtime_closure(wheel: Path) -> list[Any]:
    """The installed distributions `pip install <wheel>` (no extras) needs: its Requires-Dist without extras,
    recursively, as installed in this environment (each must satisfy its specifier)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    todo = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    seen: dict[str, Any] = {}
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            pytest.fail(f"runtime dependency {req} is not installed in the test environment")
        assert req.specifier.contains(dist.version, prereleases=True), (str(req), dist.version)
        seen[name] = dist
        todo.extend(Requirement(r) for r in dist.requires or [])
    return list(seen.values())


@pytest.fixture(scope="module")
def bare_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only `pip install <wheel>` with no extras. Offline and fast: the runtime
    dependencies are linked file by file from this environment's installed copies (exactly the closure of
    the wheel's requirements; `pip check` then proves it is complete), and the wheel is installed by pip."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    for dist in _runtime_closure(wheel):
        for f in dist.files or []:
            if f.parts and f.parts[0] == "..":  # scripts outside site-packages: not needed
                continue
            dest = site / f
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(Path(dist.locate_file(f)).resolve(), dest)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    return venv


def _bare_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    return env


def test_no_extras_install_has_the_run_path_and_none_of_the_extras(bare_venv: Path, tmp_path: Path) -> None:
    py = str(bare_venv / "bin" / "python")
    code = (
        "import importlib.util as u, sys\n"
        "import pipeline, pipeline.app, pipeline.processor, pipeline.kafka.client, pipeline.kafka.broker\n"
        "import pipeline.sinks, pipeline.checkpointing\n"
        "assert pipeline.__file__.startswith(sys.prefix), pipeline.__file__\n"
        f"print(sorted(m for m in {OPTIONAL!r} if u.find_spec(m) is not None))\n"
    )
    proc = subprocess.run(
        [py, "-c", code], cwd=tmp_path, env=_bare_env(bare_venv), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"optional packages present without extras: {proc.stdout}"
    helped = subprocess.run(
        [str(bare_venv / "bin" / "pipeline"), "--help"],
        cwd=tmp_path,
        env=_bare_env(bare_venv),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "api", "bench", "evaluate"):
        assert command in helped.stdout
    # a command that needs an extra says which, in one line, exit 2
    (tmp_path / "skab").mkdir()
    for extra, args in (
        ("api", ["api", "--database-url", f"sqlite:///{tmp_path}/a.db"]),
        ("evaluate", ["evaluate", "--format", "skab", "--data", str(tmp_path / "skab")]),
        ("bench", ["bench", "--events", "10"]),
        ("train", ["train", "--stream", "sensors", "--data", str(tmp_path / "skab"), "--out", str(tmp_path / "m")]),
    ):
        proc = subprocess.run(
            [str(bare_venv / "bin" / "pipeline"), *args],
            cwd=tmp_path,
            env=_bare_env(bare_venv),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert f"needs the '{extra}' extra" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        # the whole pip command: rich read "[api]" as markup and printed `pip install 'streaming-anomaly-pipeline'`
        assert f"pip install 'streaming-anomaly-pipeline[{extra}]'" in proc.stderr, proc.stderr[-2000:]


def test_no_extras_install_runs_the_service(
    bare_venv: Path, tmp_path: Path, kafka_bootstrap: str, pg_url: str, topic_prefix: str
) -> None:
    from pipeline.simulate import simulate_sensors, strip_labels
    from tests.service_helpers import produce, topic_env

    env = {**topic_env(topic_prefix, kafka_bootstrap, pg_url), **_bare_env(bare_venv)}
    env = {k: v for k, v in env.items() if not k.startswith("PYTHON") or k == "PYTHONUNBUFFERED"}
    sensors, _ = simulate_sensors(4, 60, seed=3, spike_devices=1, anomaly_len=10)
    produce(kafka_bootstrap, env["PIPELINE_SENSORS_TOPIC"], ((r["device_id"], r) for r in strip_labels(sensors)))
    proc = subprocess.run(
        [str(bare_venv / "bin" / "pipeline"), "run", "--idle-exit", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"processor stopped: {len(sensors)} events" in proc.stderr, proc.stderr[-3000:]
