"""Faults on the real broker and the real database: broker restart mid-stream, database unavailable,
and a rebalance between two workers. Each ends by comparing the run's alerts with an uninterrupted
replay of the same topic: nothing lost, nothing duplicated, state continued."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from pipeline.kafka.client import KafkaSource, ensure_topics
from pipeline.replay.core import run_replay
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import (
    PARTITIONS,
    Runner,
    alert_set,
    make_processor,
    produce_sensors,
    sensor_records,
    settings_for,
    stop_workers,
    wait_until,
)


def _durable(db: SqlTestStore, run_id: str, group: str) -> int:
    try:
        return sum(c for c, _ in db.load_offsets(run_id, group).values())
    except Exception:  # noqa: BLE001 - a locked/unavailable database reads as "not yet"
        return -1


def _no_duplicates(db: SqlTestStore, run_id: str) -> None:
    keys = Counter((a["source_partition"], a["source_offset"]) for a in db.list_alerts(run_id=run_id))
    assert keys and max(keys.values()) == 1


def test_broker_restart_mid_stream_reconnects_and_loses_nothing(
    fresh_broker: Any, sqlite_store: SqlTestStore, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The bundled Tansu only has memory storage (its sqlite/postgres engines are not compiled in), so a
    restart empties the log. What survives a real broker restart is modelled by re-producing the same
    records in the same order (same keys -> same partitions -> same offsets) right after the restart."""
    caplog.set_level(logging.INFO)
    boot = fresh_broker.bootstrap
    s = settings_for(topic_prefix, sqlite_store.url)
    recs = sensor_records(24, 80)
    q = len(recs) // 4
    first, unread, after = recs[: 2 * q], recs[2 * q : 3 * q], recs[3 * q :]
    produce_sensors(boot, s.sensors_topic, first)
    proc, source, dlq = make_processor(
        s, boot, sqlite_store, max_batch_records=100, snapshot_interval_s=0.5, commit_interval_ms=50
    )
    gate = threading.Event()  # lets the test hold the processor between polls, so records stay unread
    gate.set()
    poll = source.poll
    source.poll = lambda timeout_ms, max_records: (gate.wait(), poll(timeout_ms, max_records))[1]  # type: ignore
    runner = Runner(proc).start()
    try:
        wait_until(lambda: _durable(sqlite_store, "live", s.group_id) == len(first), 60, "first part durable")
        gate.clear()
        time.sleep(0.3)
        produce_sensors(boot, s.sensors_topic, unread, create=False)
        fresh_broker.stop(kill=True)  # mid-stream: `unread` is in the log, not yet processed
        gate.set()
        wait_until(lambda: source.broker_down, 30, "the processor noticing the broker is gone")
        gate.clear()  # no fetch until the restarted broker holds the old log again (else: an offset reset)
        time.sleep(1.0)
        fresh_broker.start()
        produce_sensors(boot, s.sensors_topic, first + unread)  # what a durable broker would have kept
        gate.set()
        produce_sensors(boot, s.sensors_topic, after, create=False)
        wait_until(lambda: _durable(sqlite_store, "live", s.group_id) == len(recs), 60, "all events durable")
    finally:
        runner.stop.set()
        runner.join(30)
        source.close()
        dlq.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("lost connection to Kafka" in m for m in messages)
    assert any("reconnected to Kafka" in m for m in messages)
    assert not any("offset reset policy" in m for m in messages), "a durable log's restart is not a reset"
    _no_duplicates(sqlite_store, "live")
    run_replay(s, boot, [s.sensors_topic], run_id="reference", db=sqlite_store)
    assert alert_set(sqlite_store, "live") == alert_set(sqlite_store, "reference")


def test_database_unavailable_backs_off_commits_nothing_then_delivers(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    s = settings_for(topic_prefix, pg_url)
    ensure_topics(kafka_bootstrap, [s.sensors_topic], PARTITIONS)
    # statements waiting on a lock give up after 300 ms: to the processor the database is down
    db = SqlTestStore(pg_url + "%20-clock_timeout%3D300")
    proc, source, dlq = make_processor(s, kafka_bootstrap, db)
    runner = Runner(proc).start()
    locker = create_engine(pg_url).connect()
    probe = KafkaSource(kafka_bootstrap, s.group_id)
    recs = sensor_records(24, 70)  # readings 55-69 of three pumps are anomalous
    normal, anomalous = recs[: 24 * 55], recs[24 * 55 :]
    try:
        assert proc.ready.wait(30), "no partition assignment"
        produce_sensors(kafka_bootstrap, s.sensors_topic, normal, create=False)
        # the in-memory positions move after the group commit, which follows the database write
        wait_until(
            lambda: (
                _durable(pg_store, "live", s.group_id) == len(normal)
                and sum(proc.partitions.committed.values()) == len(normal)
            ),
            60,
            "normal part durable",
        )
        committed_before = dict(proc.partitions.committed)
        kafka_before = {p: probe.committed((s.sensors_topic, p)) for p in range(PARTITIONS)}
        tx = locker.begin()
        locker.execute(text("LOCK TABLE alerts, partition_checkpoints IN ACCESS EXCLUSIVE MODE"))
        produce_sensors(kafka_bootstrap, s.sensors_topic, anomalous, create=False)
        wait_until(lambda: proc.stats.db_failures >= 4, 30, "checkpoint retries")
        assert len(proc.checkpointer.pending) > 0, "alerts are waiting for the database"
        assert proc.partitions.committed == committed_before
        assert {p: probe.committed((s.sensors_topic, p)) for p in range(PARTITIONS)} == kafka_before, (
            "offsets committed to Kafka while their alerts were not durable"
        )
        tx.rollback()  # the database is back
        wait_until(lambda: _durable(pg_store, "live", s.group_id) == len(recs), 60, "delivery after recovery")
        wait_until(
            lambda: sum(probe.committed((s.sensors_topic, p)) or 0 for p in range(PARTITIONS)) == len(recs),
            30,
            "kafka commit after recovery",
        )
    finally:
        locker.close()
        runner.stop.set()
        runner.join(30)
        probe.close()
        source.close()
        dlq.close()
        db.dispose()
    assert any("offsets NOT committed; retrying" in r.getMessage() for r in caplog.records)
    _no_duplicates(pg_store, "live")
    run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="reference", db=pg_store)
    assert alert_set(pg_store, "live") == alert_set(pg_store, "reference")


def test_rebalance_moves_entities_with_their_state(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str
) -> None:
    s = settings_for(topic_prefix, pg_url)
    recs = sensor_records(24, 80)
    first, second = recs[: len(recs) // 2], recs[len(recs) // 2 :]
    produce_sensors(kafka_bootstrap, s.sensors_topic, first)
    db1, db2 = SqlTestStore(pg_url), SqlTestStore(pg_url)
    w1, src1, dlq1 = make_processor(s, kafka_bootstrap, db1)
    w2, src2, dlq2 = make_processor(s, kafka_bootstrap, db2)
    r1, r2 = Runner(w1).start(), Runner(w2).start()
    try:

        def both_own_partitions() -> bool:
            return len(src1.consumer.assignment()) == len(src2.consumer.assignment()) == PARTITIONS // 2

        wait_until(
            lambda: both_own_partitions() and _durable(pg_store, "live", s.group_id) == len(first),
            60,
            "two workers sharing the partitions and the first half durable",
        )
        moved = set(w2.scorers[s.sensors_topic].store.live())
        assert moved, "the stopped worker owned entities"
        r2.stop.set()
        r2.join(30)
        src2.close()  # leaves the group: its partitions go to w1
        wait_until(lambda: len(src1.consumer.assignment()) == PARTITIONS, 60, "w1 owning every partition")
        produce_sensors(kafka_bootstrap, s.sensors_topic, second, create=False)
        wait_until(lambda: _durable(pg_store, "live", s.group_id) == len(recs), 60, "second half durable")
    finally:
        stop_workers([r1, r2], [src1, src2, dlq1, dlq2])
    # the moved entities continued on w1 with their state: event counts span both halves
    per_entity = Counter(r["device_id"] for r in recs)
    store = w1.scorers[s.sensors_topic].store
    for e in moved:
        assert int(store.count[store.live()[e]]) == per_entity[e]
    _no_duplicates(pg_store, "live")
    run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="reference", db=pg_store)
    assert alert_set(pg_store, "live") == alert_set(pg_store, "reference")
    db1.dispose()
    db2.dispose()


def test_database_down_at_assignment_is_waited_out(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str
) -> None:
    """Without its stored positions a worker would restart state from the wrong offset: it waits instead."""
    s = settings_for(topic_prefix, pg_url)
    ensure_topics(kafka_bootstrap, [s.sensors_topic], PARTITIONS)
    recs = sensor_records(8, 40)
    produce_sensors(kafka_bootstrap, s.sensors_topic, recs, create=False)
    db = SqlTestStore(pg_url + "%20-clock_timeout%3D300")
    proc, source, dlq = make_processor(s, kafka_bootstrap, db)
    locker = create_engine(pg_url).connect()
    tx = locker.begin()
    locker.execute(text("LOCK TABLE partition_checkpoints IN ACCESS EXCLUSIVE MODE"))
    runner = Runner(proc).start()
    try:
        wait_until(lambda: proc.stats.db_failures >= 2, 30, "assignment retries")
        assert not proc.ready.is_set() and proc.stats.events == 0
        tx.rollback()
        assert proc.ready.wait(30)
        wait_until(lambda: _durable(pg_store, "live", s.group_id) == len(recs), 60, "all events durable")
    finally:
        locker.close()
        runner.stop.set()
        runner.join(30)
        source.close()
        dlq.close()
        db.dispose()
