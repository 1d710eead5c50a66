"""FastAPI app factory: alerts, incidents, per-entity recent scores, /healthz, /readyz, /metrics and the
alerts page (pipeline/web/index.html + app.js, no build step, no CDN)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from pipeline import metrics
from pipeline.checkpointing.rows import MAX_ROW_ID
from pipeline.config import Settings
from pipeline.errors import ConfigError, NotFoundError, SinkError
from pipeline.sinks.queries import AlertQueries, row_to_json

log = logging.getLogger(__name__)


def _web(name: str) -> str:
    return resources.files("pipeline.web").joinpath(name).read_text(encoding="utf-8")


IdPath = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
INCIDENT_ALERTS = 500  # alerts listed with an incident (the peak alert is found among all of them)


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    from pipeline.alerts.cli import parse_since

    try:
        return parse_since(_text("since", value), name="since")
    except ConfigError as exc:
        hint = " (a '+' in a URL reads as a space: write it %2B)" if " " in value.strip() else ""
        raise HTTPException(422, f"{exc}{hint}") from None


def _text(name: str, value: str) -> str:
    """Text from a URL, checked before it reaches SQL: PostgreSQL rejects NUL in a string literal."""
    if "\x00" in value:
        raise HTTPException(422, f"{name} must not contain a NUL character")
    if len(value) > 1024:
        raise HTTPException(422, f"{name} is longer than 1024 characters")
    return value


def _opt_text(name: str, value: str | None) -> str | None:
    return None if value is None else _text(name, value)


def create_app(
    queries: AlertQueries,
    settings: Settings | None = None,
    *,
    run_id: str | None = None,
    not_ready: Callable[[], str | None] | None = None,
    drift: Callable[[], list[dict[str, Any]]] | None = None,
) -> FastAPI:
    """`run_id` None shows every run in the database; otherwise every endpoint shows only that run.
    `not_ready`: in `pipeline run --api-port`, the processor's reason not to be ready (None: ready).
    `drift`: there too, the processor's live drift figures per stream (pipeline.processing.drift); they exist
    only in the processor's memory, so a standalone API has none."""
    settings = settings or Settings()
    app = FastAPI(title="streaming anomaly pipeline", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.state.queries, app.state.settings, app.state.run_id = queries, settings, run_id

    @app.exception_handler(SinkError)
    async def database_unavailable(request: Request, exc: SinkError) -> JSONResponse:
        """A read the database could not answer: unavailable for now (503), not a server bug (500)."""
        reason = str(exc).splitlines()[0]
        log.warning("%s %s: %s", request.method, request.url.path, reason)
        return JSONResponse({"detail": reason}, status_code=503)

    # probes (load balancers, uptime monitors) often send HEAD: the health checks and the page answer it
    # (below); one GET and one HEAD route each, so the OpenAPI document gets no duplicate operation ids
    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ok = queries.db.ping()
        why = None if not_ready is None else not_ready()
        status = "ready" if ok and why is None else "database unavailable" if not ok else why
        return JSONResponse({"status": status, "database": ok}, status_code=200 if status == "ready" else 503)

    # a standalone API (no processor in this process) has only the database's figures: the processor's own
    # metrics would read as healthy zeros (lag 0, no partition stopped) that no alert rule can trust
    exposed = REGISTRY if not_ready is not None else REGISTRY.restricted_registry(metrics.DATABASE_GAUGES)

    @app.get("/metrics")
    def prometheus() -> Response:
        incidents, backlog = metrics.lifecycle_values(lambda: queries.lifecycle_stats(run_id))
        metrics.OPEN_INCIDENTS.set(incidents)
        metrics.OUTBOX_BACKLOG.set(backlog)
        return Response(generate_latest(exposed), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/alerts")
    def list_alerts(
        entity: str | None = None,
        stream: str | None = None,
        since: str | None = Query(None, description="event time: ISO time or age (15m, 2h, 7d)"),
        status: str | None = Query(None, description="open|resolved|acked|unacked|tp|fp|unlabeled"),
        incident_id: int | None = Query(None, ge=1, le=MAX_ROW_ID),
        after_id: int | None = Query(
            None,
            ge=0,
            le=MAX_ROW_ID,
            description="a poller's cursor: alerts stored after this alert id, oldest first (pass the last id seen)",
        ),
        limit: int = Query(100, ge=1, le=5000),
    ) -> list[dict[str, Any]]:
        try:
            rows = queries.query_alerts(
                run_id=run_id,
                entity_id=_opt_text("entity", entity),
                stream=_opt_text("stream", stream),
                since=_since(since),
                status=status,
                incident_id=incident_id,
                after_id=after_id,
                limit=limit,
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return [row_to_json(r) for r in rows]

    @app.get("/api/alerts/{alert_id}")
    def get_alert(alert_id: IdPath) -> dict[str, Any]:
        try:
            row = queries.get_alert(alert_id)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        if run_id is not None and row["run_id"] != run_id:
            raise HTTPException(404, f"no alert with id {alert_id} in run {run_id!r}")
        return row_to_json(row)

    @app.get("/api/incidents")
    def list_incidents(
        status: str | None = Query(None, description="open|resolved|acked|unacked|tp|fp|unlabeled"),
        entity: str | None = None,
        stream: str | None = None,
        since: str | None = None,
        limit: int = Query(100, ge=1, le=5000),
    ) -> list[dict[str, Any]]:
        try:
            rows = queries.list_incidents(
                run_id=run_id,
                status=status,
                entity_id=_opt_text("entity", entity),
                stream=_opt_text("stream", stream),
                since=_since(since),
                limit=limit,
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return [_incident_json(r) for r in rows]

    @app.get("/api/incidents/{incident_id}")
    def get_incident(incident_id: IdPath) -> dict[str, Any]:
        try:
            inc = queries.get_incident(incident_id)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        if run_id is not None and inc["run_id"] != run_id:
            raise HTTPException(404, f"no incident with id {incident_id} in run {run_id!r}")
        alerts = queries.query_alerts(run_id=run_id, incident_id=incident_id, limit=INCIDENT_ALERTS + 1)
        peak = queries.peak_alert(incident_id)
        return {
            "incident": _incident_json(inc),
            "alerts": [row_to_json(a) for a in alerts[:INCIDENT_ALERTS]],  # the newest
            "alerts_truncated": len(alerts) > INCIDENT_ALERTS,  # all of them: /api/alerts?incident_id=ID
            "peak_alert": None if peak is None else row_to_json(peak),
        }

    @app.get("/api/entities/{entity_id}/scores")
    def entity_scores(
        entity_id: str,
        stream: str | None = None,
        limit: int = Query(500, ge=1, le=5000),
    ) -> dict[str, Any]:
        rows = queries.recent_scores(run_id, _opt_text("stream", stream), _text("entity id", entity_id), limit)
        return {
            "entity_id": entity_id,
            "stream": stream,
            "samples": [
                {
                    # without ?stream= (or with an API over every run) samples of several streams' (or runs')
                    # entities of the same id come back together: each says whose it is
                    "stream": r["stream"],
                    "run_id": r["run_id"],
                    "event_time": row_to_json(r)["event_time"],
                    "score": r["score"],
                    "threshold": r["threshold"],
                    "is_anomaly": bool(r["is_anomaly"]),
                }
                for r in rows
            ],
        }

    @app.get("/api/drift")
    def drift_figures() -> dict[str, Any]:
        """Per stream: score PSI against the champion's card, warming-up share, per-channel input PSI."""
        if drift is None:
            return {"live": False, "streams": [], "note": "drift figures come from `pipeline run --api-port`"}
        return {"live": True, "streams": drift()}

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(_web("index.html"))

    for path, endpoint in (("/healthz", healthz), ("/readyz", readyz), ("/", index)):
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.get("/app.js")
    def app_js() -> Response:
        return Response(_web("app.js"), media_type="application/javascript")

    return app


def _incident_json(r: dict[str, Any]) -> dict[str, Any]:
    out = row_to_json(r)
    out["peak_ratio"] = r["peak_score"] / r["peak_threshold"] if r["peak_threshold"] > 0 else None
    out["age_s"] = (datetime.now(timezone.utc) - _aware(r["opened_at"])).total_seconds()
    out.pop("last_alert", None)
    return out


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
