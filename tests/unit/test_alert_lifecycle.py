"""Incident lifecycle rules: open, update, resolve, suppression window, severity, replay safety."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from pipeline.alerts.lifecycle import (
    IncidentTracker,
    LifecyclePolicy,
    ScoredEvent,
    message,
    on_anomaly,
    on_normal,
    severity_of,
)
from pipeline.records import RawRecord
from schemas import load_schema
from tests.alerts_seed import alert_for

P = LifecyclePolicy(resolve_after=3, suppress_s=60.0, max_gap_s=600.0)


def ev(t: float, score: float = 10.0, thr: float = 5.0, offset: int = 0, entity: str = "C1") -> ScoredEvent:
    return ScoredEvent("transactions", entity, "tx", 0, offset, 1000.0 + t, score, thr)


@pytest.mark.parametrize(
    ("score", "expected"),
    [(5.0, "low"), (7.4, "low"), (7.5, "medium"), (14.9, "medium"), (15.0, "high"), (49.0, "high"), (50.0, "critical")],
)
def test_severity_from_ratio_past_threshold(score: float, expected: str) -> None:
    assert severity_of(score, 5.0) == expected
    assert severity_of(1.0, 0.0) == "critical"


def test_consecutive_anomalies_form_one_incident_resolved_after_n_normal() -> None:
    inc, notes = on_anomaly(None, ev(0, offset=1), P, "live")
    assert [n for n, _ in notes] == ["opened"] and inc.seq == 1 and inc.status == "open"
    assert inc.key == "live|transactions|C1|tx|0|1"
    for i in range(1, 4):
        inc2, notes = on_anomaly(inc, ev(i, offset=1 + i), P, "live")
        assert inc2 is inc and notes == []  # inside the suppression window, same severity: silent update
    assert inc.alert_count == 4
    assert on_normal(inc, 1000.0 + 10, P) is None
    assert on_normal(inc, 1000.0 + 11, P) is None
    assert on_normal(inc, 1000.0 + 12, P) == "resolved"
    assert inc.status == "resolved" and inc.resolved_at == 1012.0 and inc.seq == 2
    inc3, notes = on_anomaly(inc, ev(20, offset=9), P, "live")
    assert inc3 is not inc and [n for n, _ in notes] == ["opened"]


def test_an_anomaly_resets_the_normal_run() -> None:
    inc, _ = on_anomaly(None, ev(0), P, "live")
    on_normal(inc, 1000.0 + 1, P)
    on_normal(inc, 1000.0 + 2, P)
    on_anomaly(inc, ev(3, offset=3), P, "live")
    assert inc.normal_run == 0
    assert on_normal(inc, 1000.0 + 4, P) is None and on_normal(inc, 1000.0 + 5, P) is None
    assert on_normal(inc, 1000.0 + 6, P) == "resolved"


def test_updates_are_suppressed_within_the_window_unless_severity_escalates() -> None:
    inc, _ = on_anomaly(None, ev(0, score=6.0), P, "live")  # low
    _, notes = on_anomaly(inc, ev(30, score=6.5), P, "live")
    assert notes == []
    _, notes = on_anomaly(inc, ev(40, score=20.0), P, "live")  # high: escalation goes out at once
    assert [n for n, _ in notes] == ["updated"] and inc.severity == "high" and inc.seq == 2
    _, notes = on_anomaly(inc, ev(50, score=6.0), P, "live")
    assert notes == [] and inc.severity == "high"  # severity never drops within an incident
    _, notes = on_anomaly(inc, ev(100, score=6.0), P, "live")  # 60 s after the last notification
    assert [n for n, _ in notes] == ["updated"] and inc.seq == 3
    assert inc.peak_score == 20.0 and inc.last_score == 6.0


def test_an_anomaly_after_a_long_silence_resolves_the_old_incident_and_opens_a_new_one() -> None:
    inc, _ = on_anomaly(None, ev(0), P, "live")
    new, notes = on_anomaly(inc, ev(700, offset=5), P, "live")
    assert [n for n, _ in notes] == ["resolved", "opened"]
    assert inc.status == "resolved" and inc.resolved_at == 1000.0 and new.status == "open"


def _batch(entity_ids: list[str], anomalous: list[bool], offsets: list[int]) -> dict:
    n = len(entity_ids)
    return dict(
        records=[RawRecord("tx", 0, o, None, None, 0) for o in offsets],
        partitions=np.zeros(n, np.int32),
        ts=np.arange(n, dtype=np.float64) + 1000.0,
        entity_ids=entity_ids,
        scores=np.full(n, 10.0),
        thresholds=np.full(n, 5.0),
        is_anomaly=np.array(anomalous),
    )


def test_tracker_follows_only_relevant_entities_and_skips_replayed_events() -> None:
    t = IncidentTracker("live", P)
    # offsets 0..1 are below the committed offset: replays whose effects are durable already
    b = _batch(["A", "B", "A", "A", "B", "A"], [True, False, True, False, False, False], [0, 1, 2, 3, 4, 5])
    t.observe(
        "tx",
        "transactions",
        b["records"],
        b["partitions"],
        b["ts"],
        b["entity_ids"],
        b["scores"],
        b["thresholds"],
        b["is_anomaly"],
        {("tx", 0): 2},
    )
    assert list(t.open) == [("transactions", "A")]
    inc = t.open[("transactions", "A")]
    assert inc.opened_at == 1002.0 and inc.alert_count == 1 and inc.normal_run == 2
    assert [s.entity_id for _, s in t.buf.samples] == ["A", "A", "A"]  # B has no incident: not sampled
    write = t.prepare([])
    assert [o.message_id for o in write.outbox] == [f"{inc.key}#1"]
    t.written()
    b = _batch(["A"], [False], [6])
    t.observe(
        "tx",
        "transactions",
        b["records"],
        b["partitions"],
        b["ts"],
        b["entity_ids"],
        b["scores"],
        b["thresholds"],
        b["is_anomaly"],
        {("tx", 0): 2},
    )
    assert t.open == {} and [n.event for n in t.buf.notices] == ["resolved"]


def test_forget_drops_a_revoked_partition_and_its_unwritten_outputs() -> None:
    t = IncidentTracker("live", P)
    t.apply(ev(0, offset=1), True)
    t.apply(ScoredEvent("transactions", "Z", "tx", 1, 1, 1000.0, 9.0, 5.0), True)
    t.forget(("tx", 0))
    assert list(t.open) == [("transactions", "Z")]
    assert {n.incident.entity_id for n in t.buf.notices} == {"Z"}


def test_prepare_links_alerts_and_messages_match_the_alert_schema() -> None:
    t = IncidentTracker("live", P)
    e1, e2 = ev(0, score=6.0, offset=1), ev(1, score=60.0, offset=2)
    t.apply(e1, True)
    t.apply(e2, True)
    alerts = [alert_for(e1), alert_for(e2)]
    write = t.prepare(alerts)
    assert {a.incident_key for a in alerts} == {"live|transactions|C1|tx|0|1"}
    assert [json.loads(o.payload)["incident"]["event"] for o in write.outbox] == ["opened", "updated"]
    schema = load_schema("alert")
    for o in write.outbox:
        body = json.loads(o.payload)
        jsonschema.validate(body, schema)
        assert body["incident"]["message_id"] == o.message_id
    assert json.loads(write.outbox[1].payload)["alert_key"] == alerts[1].alert_key
    assert write.incidents[0].alert_count == 2 and write.incidents[0].severity == "critical"
    assert t.prepare(alerts).outbox == write.outbox  # idempotent until written()
    t.written()
    assert not t.prepare([])
    inc = t.open[("transactions", "C1")]
    jsonschema.validate(json.loads(message("resolved", inc)), schema)


def test_same_events_give_same_incidents() -> None:
    def run() -> list[str]:
        t = IncidentTracker("live", P)
        for i, (s, a) in enumerate([(9, True), (1, False), (12, True), (1, False), (1, False), (1, False), (30, True)]):
            t.apply(ev(i * 10, score=s, offset=i), a)
        return [o.payload for o in t.prepare([]).outbox]

    assert run() == run()
