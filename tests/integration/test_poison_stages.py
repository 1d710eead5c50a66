"""No exception raised while processing one record stops the service: a record that makes any stage raise
(decode, key check, featurize, scoring, alert building) is dead-lettered alone as processing_error naming
the stage (incident lifecycle: as incident_error, its alert stands), and every other record is scored
exactly as in a run without it.

Real broker, real SQL database, the real Processor; the failures are injected for marked devices only."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

import pipeline.processing.alerts as alerts_module
from pipeline.alerts.lifecycle import IncidentTracker, ScoredEvent
from pipeline.kafka.client import read_topic
from pipeline.processor import Processor
from pipeline.scoring.threshold import AdaptiveThreshold
from pipeline.state.store import ScoreStats
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import make_processor, produce_sensors, sensor_records, settings_for

STAGES = ("decode", "key", "featurize", "score", "alert", "observe")
FORCED = {"poison-alert", "poison-observe"}  # made anomalous, so they reach alert building and the lifecycle


@dataclass(frozen=True)
class _Threshold(AdaptiveThreshold):
    """Raises inside StreamScorer.process (after the batch was applied to state) for poison-score; threshold 0
    (every warm event anomalous) for the FORCED devices."""

    entity_ids: Callable[[np.ndarray], list[str]] = field(kw_only=True)  # the scorer's store's

    def thresholds(self, stats: ScoreStats, slots: np.ndarray, z: float | np.ndarray | None = None) -> np.ndarray:
        ids = self.entity_ids(slots)
        if "poison-score" in ids:
            raise RuntimeError("injected: scoring failed")
        thr = super().thresholds(stats, slots, z)
        return np.where(np.fromiter((e in FORCED for e in ids), bool, len(ids)), 0.0, thr)


def _inject(proc: Processor) -> None:
    scorer = next(iter(proc.scorers.values()))
    spec = scorer.spec
    decode, entity_of, columns = spec.decode, spec.entity_of, spec.columns

    def bad_decode(value: bytes | None) -> Any:
        if value is not None and b"poison-decode" in value:
            raise ValueError("injected: decoder bug")
        return decode(value)

    def bad_entity_of(rec: Any) -> str:
        if rec.device_id == "poison-key":
            raise KeyError("injected: key check bug")
        return entity_of(rec)

    def bad_columns(records: Any, partitions: Any = None, contexts: Any = None, frozen: Any = None) -> Any:
        if any(r.device_id == "poison-featurize" for r in records):
            raise OverflowError("injected: featurizer bug")
        return columns(records, partitions, contexts, frozen)

    spec.decode, spec.entity_of, spec.columns = bad_decode, bad_entity_of, bad_columns  # type: ignore[method-assign,assignment]
    tracker = proc.checkpointer.tracker
    assert tracker is not None
    apply = tracker.apply

    def bad_apply(ev: ScoredEvent, anomalous: bool) -> None:
        if ev.entity_id == "poison-observe":
            raise ValueError("injected: lifecycle bug")
        apply(ev, anomalous)

    tracker.apply = bad_apply  # type: ignore[method-assign]


def _bad_build_alerts(build: Any) -> Any:
    def bad_build(run_id: str, scorer: Any, recs: Any, ts: Any, res: Any, *args: Any) -> Any:
        if any(recs[i].key == b"poison-alert" for i in np.flatnonzero(res.is_anomaly)):
            raise ValueError("injected: alert building bug")
        return build(run_id, scorer, recs, ts, res, *args)

    return bad_build


def _run(settings: Any, bootstrap: str, db: SqlTestStore, run_id: str, inject: bool) -> Processor:
    tracker = IncidentTracker(run_id, loader=lambda t, p: db.open_incidents(run_id, t, p))
    proc, source, dlq = make_processor(settings, bootstrap, db, run_id=run_id, tracker=tracker, max_batch_records=400)
    scorer = next(iter(proc.scorers.values()))
    old = scorer.threshold
    assert isinstance(old, AdaptiveThreshold)
    scorer.threshold = _Threshold(old.global_threshold, old.knobs, entity_ids=scorer.store.entity_ids)
    if inject:
        _inject(proc)
    try:
        proc.run(threading.Event(), idle_exit_s=3.0)  # returns: nothing stopped the service
    finally:
        source.close()
        dlq.close()
    return proc


def _alerts(db: SqlTestStore, run_id: str) -> set[tuple[str, str, float]]:
    return {(a["entity_id"], str(a["event_time"]), float(f"{a['score']:.5g}")) for a in db.list_alerts(run_id=run_id)}


def test_a_record_failing_at_any_stage_is_dead_lettered_alone(
    kafka_bootstrap: str, sqlite_store: SqlTestStore, topic_prefix: str, monkeypatch: Any
) -> None:
    recs = sensor_records(12, 40)
    template = [r for r in recs if r["device_id"] == recs[0]["device_id"]][:12]
    poison = [{**r, "device_id": f"poison-{stage}"} for stage in STAGES for r in template]
    mixed: list[dict[str, Any]] = list(recs)  # each marked device's readings spread among valid ones
    for k in reversed(range(len(STAGES))):
        for j in reversed(range(12)):
            mixed.insert(k * len(recs) // len(STAGES) + j * 5, poison[k * 12 + j])

    clean_s = settings_for(f"{topic_prefix}-clean", sqlite_store.url)
    produce_sensors(kafka_bootstrap, clean_s.sensors_topic, recs)
    clean = _run(clean_s, kafka_bootstrap, sqlite_store, "clean", inject=False)

    s = settings_for(topic_prefix, sqlite_store.url)
    produce_sensors(kafka_bootstrap, s.sensors_topic, mixed)
    monkeypatch.setattr(alerts_module, "build_alerts", _bad_build_alerts(alerts_module.build_alerts))
    proc = _run(s, kafka_bootstrap, sqlite_store, "poisoned", inject=True)

    dead = [orjson.loads(r.value) for r in read_topic(kafka_bootstrap, s.dlq_topic) if r.value]
    by_stage: dict[str, set[str]] = {}
    for d in dead:
        stage = d["detail"].split(":", 1)[0].removeprefix("stage=")
        # an incident-lifecycle failure comes after scoring: the record's alert stands, its incident was not updated
        assert d["reason"] == ("incident_error" if stage == "observe" else "processing_error"), d
        by_stage.setdefault(stage, set()).add(d["key"])
    assert by_stage == {stage: {f"poison-{stage}"} for stage in STAGES}
    # records failing before or inside scoring are dead-lettered, all of them, and never scored
    for stage in ("decode", "key", "featurize", "score"):
        assert sum(d["key"] == f"poison-{stage}" for d in dead) == 12, stage
    # every other record is scored exactly once, with exactly the clean run's results: the failed batches'
    # state changes were undone before their halves were retried
    assert proc.stats.scored == clean.stats.scored + 2 * 12
    got = {a for a in _alerts(sqlite_store, "poisoned") if not a[0].startswith("poison-")}
    want = {a for a in _alerts(sqlite_store, "clean") if a[0] not in FORCED}
    assert got == want and want
    observe_failed = {d["source"]["offset"] for d in dead if d["key"] == "poison-observe"}
    alerted = {
        a["source_offset"] for a in sqlite_store.list_alerts(run_id="poisoned") if a["entity_id"] == "poison-observe"
    }
    assert alerted and alerted <= observe_failed  # alerted, and dead-lettered as incident_error
    # a lifecycle failure does not lose the alert; an alert-building failure loses only that record's alert
    assert any(a[0] == "poison-observe" for a in _alerts(sqlite_store, "poisoned"))
    assert not any(a[0] == "poison-alert" for a in _alerts(sqlite_store, "poisoned"))
