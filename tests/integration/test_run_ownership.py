"""A run's outputs live in its database under its run id, and a run belongs to one consumer group (found by
probing, 2026-12-01): the group's Kafka offsets are not durable outputs of a new database or run id; a second
group, or a replay, must not take over a service's run. Real Tansu broker and PostgreSQL."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pipeline.app import check_run_owner
from pipeline.checkpointing.rows import REPLAY_GROUP, OffsetRow
from pipeline.errors import ConfigError
from pipeline.replay.core import run_replay
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import Runner, alert_set, make_processor, produce_sensors, sensor_records, settings_for


def _run_to_the_end(settings: Any, bootstrap: str, db: SqlTestStore, run_id: str) -> int:
    """-> the alerts the run's summary counts."""
    proc, source, dlq = make_processor(settings, bootstrap, db, run_id=run_id, commit_interval_ms=50)
    runner = Runner(proc, idle_exit_s=3.0).start()
    try:
        runner.join(120)
    finally:
        source.close()
        dlq.close()
    return proc.stats.alerts


def test_a_new_run_id_in_the_same_group_scores_and_writes_everything(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the second run resumed below the group's Kafka offsets with outputs suppressed, wrote 0 alerts
    and summarised them as raised (the same happened to a new, empty database)."""
    s = settings_for(topic_prefix, pg_url)
    produce_sensors(kafka_bootstrap, s.sensors_topic, sensor_records(12, 80))
    _run_to_the_end(s, kafka_bootstrap, pg_store, "first")
    first = alert_set(pg_store, "first")
    assert first, "the stream has injected anomalies"
    caplog.set_level(logging.WARNING, logger="pipeline.processing.recovery")
    counted = _run_to_the_end(s, kafka_bootstrap, pg_store, "second")  # same group: Kafka offsets at the end
    assert alert_set(pg_store, "second") == first and counted == len(first)  # the summary said so with 0 written
    assert "no position of this run in the database; scoring from the start" in caplog.text


def _positions(db: SqlTestStore, run_id: str, group_id: str) -> None:
    db.write_checkpoint(run_id, group_id, [], [], [OffsetRow("t", 0, 10)])


def test_a_run_belongs_to_one_group_and_a_replay_run_id_is_not_a_services(
    pg_store: SqlTestStore, pg_url: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings_for(topic_prefix, pg_url)
    s.run_id, s.group_id = "plant", "group-a"
    check_run_owner(s, pg_store)  # a new run: anything goes
    _positions(pg_store, "plant", "group-a")
    check_run_owner(s, pg_store)  # its own group again
    s.group_id = "group-b"
    with pytest.raises(ConfigError, match="'plant' belongs to consumer group 'group-a': keep PIPELINE_GROUP_ID="):
        check_run_owner(s, pg_store)
    s.run_id = "what-if"
    _positions(pg_store, "what-if", REPLAY_GROUP)
    with pytest.raises(ConfigError, match="'what-if' is a replay's run id"):
        check_run_owner(s, pg_store)
    # a service's run that an earlier build let a replay write into still starts, with a warning
    _positions(pg_store, "plant", REPLAY_GROUP)
    s.run_id, s.group_id = "plant", "group-a"
    with caplog.at_level(logging.WARNING, logger="pipeline.app"):
        check_run_owner(s, pg_store)
    assert "also holds a replay's positions" in caplog.text


def test_a_replay_into_a_services_run_id_is_refused_before_it_reads(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str
) -> None:
    """The live-run guard compared only with the replaying shell's PIPELINE_RUN_ID: `replay --run-id live`
    from a shell with another one overwrote the live run's entity state."""
    s = settings_for(topic_prefix, pg_url)
    s.run_id = "my-shell"
    _positions(pg_store, "live", s.group_id)
    with pytest.raises(ConfigError, match="run id 'live' is a service's run .* pick another --run-id"):
        run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="live", db=pg_store)
    with pytest.raises(ConfigError, match="1-64 characters without spaces"):
        run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="r" * 65, db=pg_store)
