"""Database URLs and paths a user can get wrong, through the commands that read the alert database: one line
naming the problem (exit 2), never a SQLAlchemy traceback, and no empty database created at a mistyped path
(found by probing the CLI on 2026-12-01)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from models.lstm_ae import bundled_checkpoint_path
from pipeline.errors import SinkError
from pipeline.registry import ModelRegistry, RegistryError
from pipeline.sinks import Database
from pipeline.sinks.registry import SqlRegistryStore
from tests.service_helpers import run_cli

REPO = Path(__file__).resolve().parents[2]


def _pipeline(*args: str, cwd: Path, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """In a bare environment: no DATABASE_URL or PIPELINE_* of the test run leaks in."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "COLUMNS": str(columns)}
    return run_cli(*args, env=env, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nonsense", "the database URL is not a SQLAlchemy URL"),
        ("postgres://u:secret@db/alerts", "the database URL is not a SQLAlchemy URL"),
        ("mysql://u:secret@db/alerts", "database URL mysql://u:***@db/alerts: its driver"),
    ],
)
def test_a_url_that_cannot_work_is_one_line(url: str, message: str) -> None:
    with pytest.raises(SinkError) as err:
        Database(url)
    assert str(err.value).startswith(message) and "secret" not in str(err.value)
    if url.startswith("postgres://"):  # the scheme some platforms hand out: a hint (found by probing)
        assert str(err.value).endswith("write postgresql+psycopg2://)")


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("not sqlite\n" * 100)
    db = Database(f"sqlite:///{tmp_path / 'notes.db'}")
    with pytest.raises(SinkError, match=r"cannot use the database sqlite:///.*notes.db: file is not a database"):
        db.create_schema()


def test_readers_refuse_a_missing_sqlite_file_and_create_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "nowhere" / "alerts.db"
    with pytest.raises(SinkError, match=r"no database at .*nowhere/alerts.db: nothing has written there yet"):
        Database(f"sqlite:///{typo}", existing=True)
    url = f"sqlite:///{typo}"
    for args in (
        ("alerts", "list", "--database-url", url),
        ("models", "list", "--database-url", url),
        ("replay", "--diff", "a", "b", "--database-url", url),
    ):
        done = _pipeline(*args, cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (args, done.stderr)
        assert "no database at" in done.stdout + done.stderr, args
    assert not typo.parent.exists()  # nothing created at the mistyped path
    # a writer still creates the database: the first version may be registered before the service ever ran
    done = _pipeline("models", "register", str(bundled_checkpoint_path("sensors")), "--stream", "pumps",
                     "--database-url", url, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "pumps-v1", done.stderr


def test_a_version_is_registered_only_under_a_stream_name_a_stream_file_can_use(tmp_path: Path) -> None:
    store = SqlRegistryStore.connect(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        registry = ModelRegistry(store)
        for bad in ("Bad Name", "", "x" * 65):
            with pytest.raises(RegistryError, match=r"a stream name is 1-64 characters of a-z, 0-9, _ and -"):
                registry.register(bundled_checkpoint_path("sensors"), bad)
        assert registry.list() == []
        assert registry.register(bundled_checkpoint_path("sensors"), "pumps_2-b") == "pumps_2-b-v1"
    finally:
        store.dispose()


def test_models_list_never_cuts_a_version_id_in_a_narrow_terminal_or_a_pipe(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    name = "chiller-north-wing-building-seven"
    done = _pipeline("models", "register", str(bundled_checkpoint_path("sensors")), "--stream", name,
                     "--database-url", url, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = _pipeline("models", "list", "--database-url", url, cwd=tmp_path, columns=60)
    assert listed.returncode == 0 and f"{name}-v1" in listed.stdout and "…" not in listed.stdout, listed.stdout
    assert "alembic" not in listed.stderr  # a schema at head already: no migration log lines on every command


def test_registering_a_file_that_is_not_a_checkpoint_does_not_pass_on_torchs_unpickling_advice(
    tmp_path: Path,
) -> None:
    (tmp_path / "data.csv").write_text("pump_id,at,flow\nP-0,2024-05-01T00:00:00Z,1.0\n")
    store = SqlRegistryStore.connect(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        with pytest.raises(RegistryError) as err:
            ModelRegistry(store).register(tmp_path / "data.csv", "pumps")
    finally:
        store.dispose()
    assert "not a loadable model checkpoint" in str(err.value) and "weights_only" not in str(err.value)


def test_the_api_refuses_a_missing_database_and_an_address_it_cannot_listen_on(tmp_path: Path) -> None:
    import socket

    done = _pipeline("api", "--port", "18097", "--database-url", f"sqlite:///{tmp_path / 'typo.db'}", cwd=tmp_path)
    assert done.returncode == 2 and "no database at" in done.stdout + done.stderr
    assert not (tmp_path / "typo.db").exists()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _pipeline("models", "register", str(bundled_checkpoint_path("sensors")), "--stream", "pumps",
                  "--database-url", f"sqlite:///{tmp_path / 'a.db'}", cwd=tmp_path)  # fmt: skip
        done = _pipeline("api", "--port", str(port), "--database-url", f"sqlite:///{tmp_path / 'a.db'}", cwd=tmp_path)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and lines == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]
