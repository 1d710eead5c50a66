"""`pipeline alerts list|ack|label --json` against real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pipeline.alerts.cli import parse_since, register
from pipeline.sinks.sql import SqlStore
from tests.alerts_seed import seed


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> SqlStore:
    s: SqlStore = request.getfixturevalue("pg_store" if request.param == "postgresql" else "sqlite_store")
    seed(s)
    return s


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def run(cli: typer.Typer, store: SqlStore, *args: str) -> Any:
    res = CliRunner().invoke(cli, ["alerts", *args, "--database-url", store.url])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout) if "--json" in args else res.stdout


def test_list_filters(cli: typer.Typer, store: SqlStore) -> None:
    rows = run(cli, store, "list", "--json")
    assert len(rows) == 7 and rows[0]["event_time"] >= rows[-1]["event_time"]
    assert {r["entity_id"] for r in run(cli, store, "list", "--entity", "C1", "--json")} == {"C1"}
    assert {r["entity_id"] for r in run(cli, store, "list", "--status", "resolved", "--json")} == {"D7"}
    assert len(run(cli, store, "list", "--since", "2024-05-01T10:41:00Z", "--json")) == 4
    assert run(cli, store, "list", "--since", "1h", "--json") == []  # seeded event times are in 2024
    incs = run(cli, store, "list", "--incidents", "--status", "open", "--json")
    assert {i["entity_id"] for i in incs} == {"C1", "C2"}
    assert "C1" in run(cli, store, "list", "--incidents")  # the table view renders


def test_ack_and_label(cli: typer.Typer, store: SqlStore) -> None:
    alert = run(cli, store, "list", "--entity", "C2", "--json")[0]
    out = run(cli, store, "ack", str(alert["id"]), "--by", "ana", "--json")
    assert out["acked"]["acked_by"] == "ana" and out["acked"]["acked_at"].endswith("Z")
    assert [r["id"] for r in run(cli, store, "list", "--status", "acked", "--json")] == [alert["id"]]
    out = run(cli, store, "label", str(alert["id"]), "--fp", "--json")
    assert out["labeled"]["label"] == "fp"
    inc = run(cli, store, "list", "--incidents", "--entity", "C1", "--json")[0]
    out = run(cli, store, "label", str(inc["id"]), "--tp", "--incident", "--json")
    assert out["labeled"]["label"] == "tp" and out["rows"] == 6
    assert len(run(cli, store, "list", "--status", "tp", "--json")) == 5


def test_errors_are_clear(cli: typer.Typer, sqlite_store: SqlStore) -> None:
    from pipeline.errors import PipelineError

    for args in (["ack", "424242"], ["label", "1"], ["list", "--status", "bogus"], ["list", "--since", "yesterday"]):
        res = CliRunner().invoke(cli, ["alerts", *args, "--database-url", sqlite_store.url])
        assert res.exit_code != 0 and isinstance(res.exception, PipelineError), args


def test_parse_since() -> None:
    from datetime import datetime, timezone

    now = datetime(2024, 5, 2, tzinfo=timezone.utc)
    assert parse_since("1d", now) == datetime(2024, 5, 1, tzinfo=timezone.utc)
    assert parse_since("2024-05-01T00:00", now) == datetime(2024, 5, 1, tzinfo=timezone.utc)
