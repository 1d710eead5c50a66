"""`pipeline api`: serve the read API and the alerts page."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from pipeline.config import Settings


def register(app: typer.Typer) -> None:
    app.command("api")(api)


def api(
    port: Annotated[int, typer.Option(min=1, max=65535, help="listen port")] = 8000,
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL; default DATABASE_URL")] = None,
    run_id: Annotated[str | None, typer.Option(help="only this run (default: all runs)")] = None,
) -> None:
    """Serve the alerts API, the alerts page (/), /healthz, /readyz and Prometheus /metrics."""
    from pipeline.api.app import create_app
    from pipeline.api.server import serve
    from pipeline.logs import configure
    from pipeline.sinks import AlertQueries, Database

    s = Settings()
    configure(s.log_level, s.log_json)
    db = Database(database_url or s.database_url, existing=True)  # it serves what a service wrote
    try:
        db.create_schema()
        queries = AlertQueries(db)
        if run_id is not None and not queries.known_run(run_id):  # the page would read "no open incidents"
            logging.getLogger(__name__).warning(
                "run %r has written nothing to this database yet (a typo?); the API shows its rows once it does",
                run_id,
            )
        serve(create_app(queries, s, run_id=run_id), host, port)
    finally:
        db.dispose()
