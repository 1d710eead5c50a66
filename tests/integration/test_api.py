"""The read API on a real database: alerts, incidents, entity scores, health, readiness, metrics, page."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from pipeline.api import create_app
from pipeline.sinks.sql import SqlStore
from tests.alerts_seed import seed


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request: pytest.FixtureRequest) -> TestClient:
    store: SqlStore = request.getfixturevalue("pg_store" if request.param == "postgresql" else "sqlite_store")
    seed(store)
    return TestClient(create_app(store))


def test_incidents_alerts_and_scores(client: TestClient) -> None:
    incs = client.get("/api/incidents", params={"status": "open"}).json()
    assert [i["entity_id"] for i in incs] == ["C1", "C2"]  # newest activity first
    c1 = incs[0]
    assert c1["severity"] == "critical" and c1["peak_ratio"] == pytest.approx(11.0) and "last_alert" not in c1
    detail = client.get(f"/api/incidents/{c1['id']}").json()
    assert len(detail["alerts"]) == 5 and detail["peak_alert"]["score"] == 55.0
    assert detail["peak_alert"]["top_features"][0]["feature"] == "log_amount"
    assert client.get("/api/incidents/99999").status_code == 404
    alerts = client.get("/api/alerts", params={"entity": "C1", "limit": 2}).json()
    assert len(alerts) == 2 and alerts[0]["event_time"].endswith("Z")
    assert client.get("/api/alerts", params={"status": "nope"}).status_code == 422
    assert client.get(f"/api/alerts/{alerts[0]['id']}").json()["entity_id"] == "C1"
    scores = client.get("/api/entities/C1/scores", params={"stream": "transactions"}).json()
    assert [s["score"] for s in scores["samples"]] == [6.0, 9.0, 14.0, 30.0, 55.0, 4.0, 3.0]
    assert scores["samples"][0]["is_anomaly"] is True and scores["samples"][-1]["threshold"] == 5.0


def test_health_ready_metrics_and_page(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    body = client.get("/metrics").text
    for name in ("pipeline_events_total", "pipeline_consumer_lag", "pipeline_batch_size", "pipeline_live_entities",
                 "pipeline_alerts_total", "pipeline_dead_letters_total", "pipeline_open_incidents 2.0"):
        assert name in body
    page = client.get("/")
    assert page.status_code == 200 and 'id="incidents"' in page.text
    assert "plotScores" in client.get("/app.js").text


def test_readyz_is_503_without_a_database(tmp_path: object) -> None:
    store = SqlStore("postgresql+psycopg2://nobody@127.0.0.1:1/none?connect_timeout=1")
    c = TestClient(create_app(store))
    assert c.get("/readyz").status_code == 503
    assert c.get("/healthz").status_code == 200
    assert c.get("/metrics").status_code == 200
