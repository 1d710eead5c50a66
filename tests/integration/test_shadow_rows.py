"""Shadow scoring on the real broker and PostgreSQL, with the incident lifecycle and the alerts topic on: the
challenger's would-be alerts land in shadow_alerts only; they never open an incident, never reach the outbox
or the alerts topic; both versions' score samples are written, and writing them again adds nothing."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from typing import Any

from sqlalchemy import func, select

from pipeline.alerts.outbox import OutboxRelay
from pipeline.app import build_scorers, ensure_models, incident_tracker
from pipeline.checkpointing.rows import AlertRow, ModelScoreRow, ModelWrite
from pipeline.kafka.client import KafkaDeadLetterSink, KafkaPublisher, KafkaSource, ensure_topics
from pipeline.kafka.tail import follow
from pipeline.processing.retry import DbRetry
from pipeline.processor import Processor, ProcessorOptions
from pipeline.sinks.tables import model_score_samples, shadow_alerts
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import PARTITIONS, Runner, produce_sensors, sensor_records, settings_for, wait_until


def _table(db: SqlTestStore, table: Any) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(m) for m in conn.execute(select(table)).mappings()]


def test_shadow_rows_never_reach_incidents_or_the_alerts_topic(
    pg_store: SqlTestStore, kafka_bootstrap: str, topic_prefix: str
) -> None:
    s = settings_for(topic_prefix, pg_store.url)
    s.alerts_topic = f"{topic_prefix}-alerts"
    recs = sensor_records(12, 120)
    ensure_topics(kafka_bootstrap, [s.sensors_topic, s.dlq_topic, s.alerts_topic], PARTITIONS)
    produce_sensors(kafka_bootstrap, s.sensors_topic, recs)

    champion = ensure_models(s)["sensors"]
    # the same network with half the threshold: alerts where the champion has none
    challenger = replace(
        champion, card={**champion.card, "version": "sensors-challenger"}, threshold=champion.threshold * 0.5
    )
    source = KafkaSource(kafka_bootstrap, s.group_id, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    dlq = KafkaDeadLetterSink(kafka_bootstrap, s.dlq_topic)
    publisher = KafkaPublisher(kafka_bootstrap, s.alerts_topic)
    retry = DbRetry(s.db_retry_max_s)
    proc = Processor(
        source,
        pg_store,
        dlq,
        build_scorers(s, {"sensors": champion}),
        ProcessorOptions(group_id=s.group_id, max_batch_records=200, score_sample_rate=0.2),
        tracker=incident_tracker(s, pg_store, retry),
        relay=OutboxRelay(pg_store, publisher, s.run_id),
        db_retry=retry,
        challengers=build_scorers(s, {"sensors": challenger}),
    )
    runner = Runner(proc).start()
    try:
        wait_until(
            lambda: sum(c for c, _ in pg_store.load_offsets("live", s.group_id).values()) == len(recs),
            90,
            "every reading durable",
        )
    finally:
        runner.stop.set()
        runner.join(60)
        for client in (source, dlq, publisher):
            client.close()

    alerts = pg_store.list_alerts(run_id="live")
    shadow = _table(pg_store, shadow_alerts)
    assert {a["model_version"] for a in alerts} == {champion.version}
    assert {a["model_version"] for a in shadow} == {challenger.version}
    position = ("source_partition", "source_offset")
    champion_at = {tuple(a[k] for k in position) for a in alerts}
    shadow_only = {tuple(a[k] for k in position) for a in shadow} - champion_at
    assert champion_at and shadow_only  # the challenger alerts where the champion does not
    assert all(a["incident_key"] is None for a in shadow)

    # incidents count the champion's alerts only; the outbox and the topic carry only the champion's
    incidents = pg_store.list_incidents(run_id="live")
    assert incidents and sum(i["alert_count"] for i in incidents) == len(alerts)
    keys = {a["alert_key"] for a in alerts}
    outbox = pg_store.outbox_rows("live")
    assert outbox and all(json.loads(r["payload"])["alert_key"] in keys for r in outbox)
    published = [
        json.loads(v) for _, v in follow(kafka_bootstrap, s.alerts_topic, from_beginning=True, idle_timeout_s=1.5)
    ]
    assert len(published) == len(outbox)
    assert {m["model_version"] for m in published} == {champion.version}
    assert all(m["alert_key"] in keys for m in published)
    assert not {(m["source"]["partition"], m["source"]["offset"]) for m in published} & shadow_only

    # score samples of both versions, on the same events; a second write of samples and shadow alerts adds nothing
    samples = _table(pg_store, model_score_samples)
    by_version = {
        v: {(r["entity_id"], r["event_time"]) for r in samples if r["model_version"] == v}
        for v in (champion.version, challenger.version)
    }
    assert by_version[champion.version] and by_version[challenger.version] == by_version[champion.version]
    again = ModelWrite(
        [AlertRow(**{k: v for k, v in a.items() if k in {f.name for f in fields(AlertRow)}}) for a in shadow],
        [
            ModelScoreRow(
                r["stream"], r["model_version"], r["entity_id"], r["event_time"], r["score"], s.sensors_topic, 0, 0
            )
            for r in samples
        ],
    )
    pg_store.write_checkpoint("live", s.group_id, [], [], [], models=again)
    with pg_store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(model_score_samples)).scalar_one() == len(samples)
        assert conn.execute(select(func.count()).select_from(shadow_alerts)).scalar_one() == len(shadow)
