"""`pipeline alerts list|ack|label --json` against real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pipeline.alerts.cli import parse_since, register
from pipeline.sinks import Database
from tests.alerts_seed import seed


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Database:
    s: Database = request.getfixturevalue("pg_store" if request.param == "postgresql" else "sqlite_store")
    seed(s)
    return s


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def run(cli: typer.Typer, db: Database, *args: str) -> Any:
    res = CliRunner().invoke(cli, ["alerts", *args, "--database-url", db.url])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout) if "--json" in args else res.stdout


def test_list_filters(cli: typer.Typer, db: Database) -> None:
    rows = run(cli, db, "list", "--json")
    assert len(rows) == 7 and rows[0]["event_time"] >= rows[-1]["event_time"]
    assert {r["entity_id"] for r in run(cli, db, "list", "--entity", "C1", "--json")} == {"C1"}
    assert {r["entity_id"] for r in run(cli, db, "list", "--status", "resolved", "--json")} == {"D7"}
    assert len(run(cli, db, "list", "--since", "2024-05-01T10:41:00Z", "--json")) == 4
    assert run(cli, db, "list", "--since", "1h", "--json") == []  # seeded event times are in 2024
    incs = run(cli, db, "list", "--incidents", "--status", "open", "--json")
    assert {i["entity_id"] for i in incs} == {"C1", "C2"}
    assert "C1" in run(cli, db, "list", "--incidents")  # the table view renders
    # a list cut at --limit says so (a probe read "100 alerts" as all of them)
    total = len(rows)
    assert f"{total} alerts" in run(cli, db, "list", "--limit", str(total + 1))
    assert f"the newest {total - 1} alerts (--limit {total - 1}; there may be more)" in " ".join(
        run(cli, db, "list", "--limit", str(total - 1)).split()
    )


def test_ack_and_label(cli: typer.Typer, db: Database) -> None:
    alert = run(cli, db, "list", "--entity", "C2", "--json")[0]
    out = run(cli, db, "ack", str(alert["id"]), "--by", "ana", "--json")
    assert out["acked"]["acked_by"] == "ana" and out["acked"]["acked_at"].endswith("Z")
    assert [r["id"] for r in run(cli, db, "list", "--status", "acked", "--json")] == [alert["id"]]
    out = run(cli, db, "label", str(alert["id"]), "--fp", "--json")
    assert out["labeled"]["label"] == "fp"
    inc = run(cli, db, "list", "--incidents", "--entity", "C1", "--json")[0]
    out = run(cli, db, "label", str(inc["id"]), "--tp", "--incident", "--json")
    assert out["labeled"]["label"] == "tp" and out["rows"] == 6
    assert len(run(cli, db, "list", "--status", "tp", "--json")) == 5


def test_a_second_ack_keeps_the_first_and_says_so(cli: typer.Typer, db: Database) -> None:
    """A probe's second `alerts ack 27 --by someone-else` overwrote who acked it and when, and printed the
    same "acknowledged" line: the audit trail lost the first acknowledger."""
    alert = run(cli, db, "list", "--entity", "C2", "--json")[0]
    first = run(cli, db, "ack", str(alert["id"]), "--by", "ana", "--json")["acked"]
    again = run(cli, db, "ack", str(alert["id"]), "--by", "bo")
    assert f"alert {alert['id']} was already acknowledged by ana at {first['acked_at']}; nothing changed" in " ".join(
        again.split()
    )
    assert run(cli, db, "list", "--entity", "C2", "--json")[0]["acked_by"] == "ana"


def test_after_id_lists_alerts_in_the_order_stored(cli: typer.Typer, db: Database) -> None:
    every = run(cli, db, "list", "--after-id", "0", "--json")
    ids = [a["id"] for a in every]
    assert len(ids) == 7 and ids == sorted(ids)
    assert [a["id"] for a in run(cli, db, "list", "--after-id", str(ids[2]), "--limit", "2", "--json")] == ids[3:5]


def test_a_run_id_that_wrote_nothing_is_noted(cli: typer.Typer, db: Database) -> None:
    res = CliRunner().invoke(cli, ["alerts", "list", "--run-id", "lvie", "--json", "--database-url", db.url])
    assert res.exit_code == 0 and json.loads(res.stdout) == []
    assert "run 'lvie' wrote nothing to this database" in res.stderr


def test_errors_are_clear(cli: typer.Typer, sqlite_store: Database) -> None:
    from pipeline.errors import PipelineError

    seed(sqlite_store)
    for args, says in (
        (["label", "1", "--tp", "--fp"], "give one of --tp or --fp, not both"),  # the last flag won
        (["ack", "1", "--by", "x" * 65], "--by must be 1-64 characters"),  # cut to 64 without a word
        (["label", "424242", "--tp", "--publish-label", "--bootstrap", "127.0.0.1:1"], "no alert with id 424242"),
        (["list", "--incidents", "--after-id", "3"], "--after-id is a cursor over alerts"),
    ):
        res = CliRunner().invoke(cli, ["alerts", *args, "--database-url", sqlite_store.url])
        assert isinstance(res.exception, PipelineError) and says in str(res.exception), (args, res.output)
    for args in (["ack", "424242"], ["label", "1"], ["list", "--status", "bogus"], ["list", "--since", "yesterday"]):
        res = CliRunner().invoke(cli, ["alerts", *args, "--database-url", sqlite_store.url])
        assert res.exit_code != 0 and isinstance(res.exception, PipelineError), args
    down = "postgresql+psycopg2://nobody@127.0.0.1:1/none?connect_timeout=1"  # nothing listens on port 1
    res = CliRunner().invoke(cli, ["alerts", "list", "--database-url", down])
    assert isinstance(res.exception, PipelineError) and "cannot reach the database" in str(res.exception)


def test_parse_since() -> None:
    from datetime import datetime, timezone

    now = datetime(2024, 5, 2, tzinfo=timezone.utc)
    assert parse_since("1d", now) == datetime(2024, 5, 1, tzinfo=timezone.utc)
    assert parse_since("2024-05-01T00:00", now) == datetime(2024, 5, 1, tzinfo=timezone.utc)
