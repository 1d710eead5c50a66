"""Fault 2 of issue 11: a database outage while the processor loads entity state (new customers), open
incidents or partition checkpoints is waited out with backoff; the processor reports not ready meanwhile,
does not exit, and delivers everything once the database is back. Real Tansu, real PostgreSQL behind a TCP
proxy that the test cuts and restores."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from pipeline.alerts.outbox import OutboxRelay
from pipeline.app import build_scorers, ensure_models, incident_tracker
from pipeline.kafka.client import (
    KafkaDeadLetterSink,
    KafkaPublisher,
    KafkaSource,
    ensure_topics,
    make_producer,
    produce_json,
)
from pipeline.processing.retry import DbRetry
from pipeline.processor import Processor, ProcessorOptions
from pipeline.replay.core import run_replay
from pipeline.simulate import simulate_transactions, strip_labels
from tests.recovery_helpers import TcpProxy, db_target, proxied_url
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import PARTITIONS, Runner, alert_set, settings_for, wait_until


def _payments(customers: int, events: int, seed: int, prefix: str, bursts: int) -> list[dict[str, Any]]:
    recs, _ = simulate_transactions(customers, events, seed=seed, burst_customers=bursts)
    out = strip_labels(recs)
    for r in out:  # new entities (and new transaction ids, so no dedupe applies)
        r["customer_id"] = prefix + r["customer_id"]
        r["transaction_id"] = prefix + str(r["transaction_id"])
    return out


def _produce(bootstrap: str, topic: str, recs: list[dict[str, Any]]) -> None:
    producer = make_producer(bootstrap)
    try:
        produce_json(producer, topic, ((r["customer_id"], r) for r in recs))
    finally:
        producer.close()


def _durable(db: SqlTestStore, run_id: str, group: str) -> int:
    try:
        return sum(c for c, _ in db.load_offsets(run_id, group).values())
    except Exception:  # noqa: BLE001 - unavailable reads as "not yet"
        return -1


def test_database_cut_while_loading_new_entities_waits_not_ready_then_delivers(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    s = settings_for(topic_prefix, pg_url)
    s.alerts_topic = f"{topic_prefix}-alerts"
    ensure_topics(kafka_bootstrap, [s.transactions_topic, s.dlq_topic, s.alerts_topic], PARTITIONS)
    proxy = TcpProxy(*db_target(pg_url)).start()
    db = SqlTestStore(proxied_url(pg_url, proxy))
    scorers = build_scorers(s, {"transactions": ensure_models(s)["transactions"]})
    source = KafkaSource(kafka_bootstrap, s.group_id, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    dlq = KafkaDeadLetterSink(kafka_bootstrap, s.dlq_topic)
    # no state snapshot falls due during the cut (they are staggered over the interval, one partition every
    # 2.5 s by default): else a snapshot checkpoint may hit the cut before the new payments are polled, and
    # the processor waits in the checkpoint retry instead of in the state loads this test is about
    retry = DbRetry(max_delay_s=1.0)
    publisher = KafkaPublisher(kafka_bootstrap, s.alerts_topic)
    proc = Processor(
        source,
        db,
        dlq,
        scorers,
        ProcessorOptions(
            run_id="live", group_id=s.group_id, db_retry_max_s=1.0, commit_interval_ms=100, snapshot_interval_s=3600.0
        ),
        tracker=incident_tracker(s, db, retry),  # open-incident loads go through the proxy too
        relay=OutboxRelay(db, publisher, "live"),
        db_retry=retry,
    )
    first = _payments(60, 40, seed=31, prefix="A", bursts=2)
    second = _payments(200, 12, seed=32, prefix="B", bursts=0)  # 200 customers never seen: state loads
    runner = Runner(proc).start()
    try:
        assert proc.ready.wait(30), "no partition assignment"
        _produce(kafka_bootstrap, s.transactions_topic, first)
        wait_until(lambda: _durable(pg_store, "live", s.group_id) == len(first), 60, "first batch durable")
        time.sleep(2.0)  # traffic stops
        proxy.cut()
        failures = proc.stats.db_failures
        _produce(kafka_bootstrap, s.transactions_topic, second)
        wait_until(
            lambda: any("entity states" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records),
            30,
            "entity-state loads retrying",
        )
        assert not proc.ready.is_set(), "ready while the database is unreachable"
        time.sleep(3.0)  # several retries
        assert runner.thread.is_alive() and runner.error is None, f"processor exited: {runner.error!r}"
        assert not proc.ready.is_set()
        assert proc.stats.db_failures > failures + 2
        assert _durable(pg_store, "live", s.group_id) == len(first), "offsets moved while the database was down"
        proxy.restore()
        wait_until(
            lambda: _durable(pg_store, "live", s.group_id) == len(first) + len(second),
            60,
            "delivery after the database came back",
        )
        wait_until(proc.ready.is_set, 10, "ready again")
    finally:
        runner.stop.set()
        runner.join(60)
        source.close()
        dlq.close()
        publisher.close()
        db.dispose()
        proxy.close()
    assert proc.stats.scored == len(first) + len(second)
    run_replay(s, kafka_bootstrap, [s.transactions_topic], run_id="reference", db=pg_store)
    live, ref = alert_set(pg_store, "live"), alert_set(pg_store, "reference")
    assert ref and live == ref
