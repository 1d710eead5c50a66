"""The read API on a real database: alerts, incidents, entity scores, health, readiness, metrics, page."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from pipeline.api import create_app
from pipeline.sinks import AlertQueries, Database
from tests.alerts_seed import seed

DOWN_URL = "postgresql+psycopg2://nobody@127.0.0.1:1/none?connect_timeout=1"  # nothing listens on port 1


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request: pytest.FixtureRequest) -> TestClient:
    db: Database = request.getfixturevalue("pg_store" if request.param == "postgresql" else "sqlite_store")
    seed(db)
    return TestClient(create_app(AlertQueries(db)))


@pytest.fixture()
def down() -> Iterator[TestClient]:
    """The API in front of a PostgreSQL that refuses connections."""
    db = Database(DOWN_URL)
    try:
        yield TestClient(create_app(AlertQueries(db)))
    finally:
        db.dispose()


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
    assert "pipeline_open_incidents 2.0" in body and "pipeline_alerts_outbox_unpublished" in body
    # a standalone API serves the database's figures only: the processor's metrics would read as healthy zeros
    for name in ("pipeline_events_total", "pipeline_consumer_lag", "pipeline_partitions_stopped"):
        assert name not in body
    # inside `pipeline run --api-port` (a processor in the process) it serves every metric
    inside = TestClient(create_app(client.app.state.queries, not_ready=lambda: None)).get("/metrics").text  # type: ignore[attr-defined]
    for name in (
        "pipeline_events_total",
        "pipeline_consumer_lag",
        "pipeline_batch_size",
        "pipeline_live_entities",
        "pipeline_alerts_total",
        "pipeline_dead_letters_total",
        "pipeline_open_incidents 2.0",
    ):
        assert name in inside
    page = client.get("/")
    assert page.status_code == 200 and 'id="incidents"' in page.text
    assert "plotScores" in client.get("/app.js").text
    # probes that send HEAD (load balancers, uptime monitors) get the GET status, without a body
    for path in ("/healthz", "/readyz", "/"):
        head = client.head(path)
        assert head.status_code == 200 and head.content == b"", path
    # and the OpenAPI document (/docs) lists each once: a GET+HEAD route logged "Duplicate Operation ID"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = client.get("/openapi.json").json()
    assert list(spec["paths"]["/healthz"]) == ["get"] and list(spec["paths"]["/"]) == ["get"]


def test_readyz_is_503_without_a_database(down: TestClient) -> None:
    assert down.get("/readyz").status_code == 503
    assert down.get("/healthz").status_code == 200
    assert down.get("/metrics").status_code == 200


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/api/alerts", "could not query alerts: database unavailable"),
        ("/api/alerts/1", "could not read alert 1: database unavailable"),
        ("/api/incidents", "could not list incidents: database unavailable"),
        ("/api/incidents/1", "could not read incident 1: database unavailable"),
        ("/api/entities/C1/scores", "could not read score samples: database unavailable"),
    ],
)
def test_reads_without_a_database_are_503_with_what_failed(down: TestClient, path: str, says: str) -> None:
    r = down.get(path)
    assert r.status_code == 503, r.text
    assert r.json()["detail"].startswith(says)


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/api/entities/C0%00/scores", "entity id must not contain a NUL character"),
        ("/api/entities/C1/scores?stream=tx%00", "stream must not contain a NUL character"),
        ("/api/alerts?entity=C%00", "entity must not contain a NUL character"),
        ("/api/incidents?stream=%00", "stream must not contain a NUL character"),
        ("/api/alerts?since=100000000d", "before the year 1"),
        ("/api/alerts?since=99999999999999999999d", "before the year 1"),
        ("/api/incidents?since=9999-12-31T23:59:59-23:59", "outside the years 1..9999"),
        ("/api/alerts?since=0001-01-01T00:00:00%2B23:59", "outside the years 1..9999"),
        ("/api/alerts?since=yesterday", "give an ISO time"),
        ("/api/alerts/99999999999999999999", "less than or equal to 9223372036854775807"),
        ("/api/incidents/9223372036854775808", "less than or equal to 9223372036854775807"),
        ("/api/alerts?incident_id=99999999999999999999", "less than or equal to 9223372036854775807"),
        ("/api/alerts/0", "greater than or equal to 1"),
    ],
)
def test_bad_input_is_422_with_the_reason(client: TestClient, path: str, says: str) -> None:
    r = client.get(path)
    assert r.status_code == 422, r.text
    assert says in r.text


def test_run_id_scopes_every_endpoint(pg_store: Database) -> None:
    seed(pg_store, run_id="other")
    seed(pg_store, run_id="live")
    every = TestClient(create_app(AlertQueries(pg_store)))
    mine = TestClient(create_app(AlertQueries(pg_store), run_id="live"))
    other_alerts = [a for a in every.get("/api/alerts", params={"limit": 5000}).json() if a["run_id"] == "other"]
    other_incs = [i for i in every.get("/api/incidents", params={"limit": 5000}).json() if i["run_id"] == "other"]
    assert other_alerts and other_incs
    for a in other_alerts:
        assert mine.get(f"/api/alerts/{a['id']}").status_code == 404
        assert every.get(f"/api/alerts/{a['id']}").status_code == 200
    for i in other_incs:
        assert mine.get(f"/api/incidents/{i['id']}").status_code == 404
        assert mine.get("/api/alerts", params={"incident_id": i["id"]}).json() == []
    assert {a["run_id"] for a in mine.get("/api/alerts", params={"limit": 5000}).json()} == {"live"}
    incs = mine.get("/api/incidents", params={"limit": 5000}).json()
    assert {i["run_id"] for i in incs} == {"live"}
    detail = mine.get(f"/api/incidents/{incs[0]['id']}").json()
    assert detail["alerts"] and {a["run_id"] for a in detail["alerts"]} == {"live"}
    samples = every.get("/api/entities/C1/scores").json()["samples"]
    assert len(mine.get("/api/entities/C1/scores").json()["samples"]) * 2 == len(samples)
    assert {s["run_id"] for s in samples} == {"live", "other"}  # each sample says whose it is
    assert {s["stream"] for s in samples} == {"transactions"}
    assert "pipeline_open_incidents 2.0" in mine.get("/metrics").text
    assert "pipeline_open_incidents 4.0" in every.get("/metrics").text


def test_metrics_reads_nan_without_a_database_but_does_not_hide_bugs(pg_store: Database, down: TestClient) -> None:
    body = down.get("/metrics").text
    assert "pipeline_open_incidents NaN" in body and "pipeline_alerts_outbox_unpublished NaN" in body

    class Broken(AlertQueries):
        def lifecycle_stats(self, run_id: str | None = None) -> dict[str, int]:
            raise KeyError("open_incidents")  # a bug, not an outage: it must surface as a 500

    r = TestClient(create_app(Broken(pg_store)), raise_server_exceptions=False).get("/metrics")
    assert r.status_code == 500


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_incident_of_more_than_500_alerts_reports_its_real_peak_and_says_the_list_is_cut(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """A probe's incident of 700 alerts peaked in its first alerts; /api/incidents/ID listed the newest 500
    and took the peak among them (score 3,486 instead of 228,896), so the page showed the wrong alert."""
    from pipeline.alerts.lifecycle import IncidentTracker, LifecyclePolicy, ScoredEvent
    from tests.alerts_seed import T0, feed

    db: Database = request.getfixturevalue("pg_store" if backend == "postgresql" else "sqlite_store")
    tracker = IncidentTracker("live", LifecyclePolicy(resolve_after=3, suppress_s=60.0))
    scores = [1000.0 if i == 3 else 10.0 + i % 7 for i in range(620)]  # the peak, early
    events = [(ScoredEvent("sensors", "bigdev", "sn", 0, i, T0 + i, s, 5.0), True) for i, s in enumerate(scores)]
    feed(db, tracker, events)
    client = TestClient(create_app(AlertQueries(db)))
    inc = client.get("/api/incidents").json()[0]
    detail = client.get(f"/api/incidents/{inc['id']}").json()
    assert inc["alert_count"] == 620 and len(detail["alerts"]) == 500 and detail["alerts_truncated"] is True
    assert detail["peak_alert"]["score"] == 1000.0 and detail["peak_alert"]["source_offset"] == 3
    every = client.get("/api/alerts", params={"incident_id": inc["id"], "limit": 5000}).json()
    assert len(every) == 620  # the whole list, as the truncation flag says


def test_a_poller_with_after_id_gets_every_alert_once_in_the_order_stored(client: TestClient) -> None:
    """`since` is event time: a poller that kept the newest event time it saw missed alerts of late events
    (a probe: 700 new alerts of a device sending 2019 times, 0 returned) and got the boundary alert again.
    `after_id` is a cursor over the order alerts were stored."""
    from pipeline.alerts.lifecycle import IncidentTracker, LifecyclePolicy, ScoredEvent
    from tests.alerts_seed import T0, feed

    seen = client.get("/api/alerts", params={"after_id": 0, "limit": 3}).json()
    ids = [a["id"] for a in seen]
    assert ids == sorted(ids) and len(ids) == 3
    while True:  # drain the rest
        page = client.get("/api/alerts", params={"after_id": ids[-1], "limit": 3}).json()
        if not page:
            break
        ids += [a["id"] for a in page]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 7  # the seed's 7 alerts
    newest_time = client.get("/api/alerts", params={"limit": 1}).json()[0]["event_time"]
    db = client.app.state.queries.db  # type: ignore[attr-defined]
    old_t = T0 - 86400 * 400  # a device whose clock (or backlog) is a year behind
    late = [(ScoredEvent("sensors", "olddev", "sn", 0, 100 + i, old_t + i, 9.0, 2.0), True) for i in range(4)]
    feed(db, IncidentTracker("live", LifecyclePolicy()), late)
    assert all(a["entity_id"] != "olddev" for a in client.get("/api/alerts", params={"since": newest_time}).json())
    new = client.get("/api/alerts", params={"after_id": ids[-1]}).json()
    assert [a["entity_id"] for a in new] == ["olddev"] * 4 and [a["source_offset"] for a in new] == [100, 101, 102, 103]


def test_a_since_with_a_plus_sent_unencoded_says_how_to_write_it(client: TestClient) -> None:
    r = client.get("/api/alerts?since=2018-05-01T00:00:00+05:30")
    assert r.status_code == 422 and "since '2018-05-01T00:00:00 05:30'" in r.text and "%2B" in r.text
    assert "--since" not in r.text  # the API names its own parameter
