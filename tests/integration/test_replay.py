"""Replay on the real broker: isolated from the live run, deterministic, equal to the live run over the
same records, exact time bounds whatever offsets_for_times answers, and a diff of two runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.lstm_ae import bundled_checkpoint_path, load_blob
from pipeline.checkpointing.rows import REPLAY_GROUP, OffsetRow
from pipeline.errors import ConfigError
from pipeline.kafka.client import KafkaSource
from pipeline.replay.core import diff_runs, run_replay
from pipeline.simulate import simulate_transactions, strip_labels
from tests.service_helpers import produce
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import (
    Runner,
    alert_set,
    event_ms,
    make_processor,
    position_set,
    produce_sensors,
    sensor_records,
    settings_for,
)


def test_replay_equals_live_run_is_isolated_and_deterministic(
    kafka_bootstrap: str, sqlite_store: SqlTestStore, topic_prefix: str
) -> None:
    s = settings_for(topic_prefix, sqlite_store.url)
    recs = sensor_records(24, 70)
    produce_sensors(kafka_bootstrap, s.sensors_topic, recs)

    proc, source, dlq = make_processor(s, kafka_bootstrap, sqlite_store, max_batch_records=300)
    Runner(proc, idle_exit_s=1.5).start().join(90)
    group_offsets = {p: source.committed((s.sensors_topic, p)) for p in range(4)}
    source.close()
    dlq.close()
    live_db_offsets = sqlite_store.load_offsets("live", s.group_id)
    live = alert_set(sqlite_store, "live")
    assert proc.stats.events == len(recs) and live, "the live run saw everything and alerted"

    r1 = run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="replay-a", db=sqlite_store)
    r2 = run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="replay-b", db=sqlite_store, seek_mode="scan")
    assert r1.events == r2.events == len(recs)
    assert alert_set(sqlite_store, "replay-a") == live
    assert alert_set(sqlite_store, "replay-b") == live
    # isolation: the live group's Kafka offsets and the live run's DB rows are untouched
    probe = KafkaSource(kafka_bootstrap, s.group_id)
    assert {p: probe.committed((s.sensors_topic, p)) for p in range(4)} == group_offsets
    probe.close()
    assert sqlite_store.load_offsets("live", s.group_id) == live_db_offsets
    assert all(a["run_id"] == "replay-a" for a in sqlite_store.list_alerts(run_id="replay-a"))

    d = diff_runs(sqlite_store, "live", "replay-a")
    assert (d["added"], d["removed"], d["common"]) == (0, 0, len(live))

    # --diff names a run id that wrote nothing: a clear error (exit 2), not two empty tables and exit 0
    assert sqlite_store.known_run("replay-a") and not sqlite_store.known_run("replay-typo")
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "replay", "--diff", "replay-a", "replay-typo"],
        env={**os.environ, "PIPELINE_DATABASE_URL": sqlite_store.url, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "no run 'replay-typo'" in res.stdout + res.stderr, res
    assert "'replay-a'" not in res.stdout + res.stderr


def test_time_range_is_exact_by_record_timestamp(
    kafka_bootstrap: str, sqlite_store: SqlTestStore, topic_prefix: str
) -> None:
    s = settings_for(topic_prefix, sqlite_store.url)
    recs = sensor_records(24, 70)
    produce_sensors(kafka_bootstrap, s.sensors_topic, recs)
    stamps = sorted(event_ms(r) for r in recs)
    lo, hi = stamps[len(stamps) // 3], stamps[2 * len(stamps) // 3]
    expected = sum(lo <= t < hi for t in stamps)

    auto = run_replay(s, kafka_bootstrap, [s.sensors_topic], from_ms=lo, to_ms=hi, run_id="r-auto", db=sqlite_store)
    scan = run_replay(
        s, kafka_bootstrap, [s.sensors_topic], from_ms=lo, to_ms=hi, run_id="r-scan", db=sqlite_store, seek_mode="scan"
    )
    assert auto.events == scan.events == expected
    assert alert_set(sqlite_store, "r-auto") == alert_set(sqlite_store, "r-scan")
    for a in sqlite_store.list_alerts(run_id="r-auto"):
        assert lo <= int(round(a["event_time"].timestamp() * 1000)) < hi

    full = run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="r-full", db=sqlite_store)
    d = diff_runs(sqlite_store, "r-full", "r-auto")
    assert d["alerts_a"] == len(position_set(sqlite_store, "r-full")) == full.alerts
    assert d["removed"] >= 1, d  # alerts outside the window are gone in the windowed run


def test_a_run_id_another_model_scored_is_refused_and_the_same_model_goes_on(
    kafka_bootstrap: str, sqlite_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    """A probe's what-if: `replay --model v4 --run-id X` where X was replayed with v5 went on from X's
    positions, scored nothing and printed "0 events in range", read as "v4 raises no alerts". Another model
    on an existing run id is refused; the same model resumes, and says so."""
    s = settings_for(topic_prefix, sqlite_store.url)
    produce_sensors(kafka_bootstrap, s.sensors_topic, sensor_records(12, 40))
    first = run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="what-if", db=sqlite_store)
    assert first.scored > 0 and not first.resumed
    blob = load_blob(bundled_checkpoint_path("sensors"))
    blob["threshold"] *= 0.5
    blob["card"] = {**blob["card"], "version": "sensors-candidate", "threshold": blob["threshold"]}
    candidate = tmp_path / "candidate.pt"
    torch.save(blob, candidate)
    with pytest.raises(ConfigError, match="another model version than sensors-candidate: pass a new --run-id"):
        run_replay(s, kafka_bootstrap, [s.sensors_topic], model=str(candidate), run_id="what-if", db=sqlite_store)
    again = run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="what-if", db=sqlite_store)
    assert again.resumed and again.scored == 0
    fresh = run_replay(s, kafka_bootstrap, [s.sensors_topic], model=str(candidate), run_id="what-if-2", db=sqlite_store)
    assert not fresh.resumed and fresh.scored == first.scored and fresh.alerts >= first.alerts


def test_a_payments_replay_resumes_past_the_partition_rows(
    kafka_bootstrap: str, sqlite_store: SqlTestStore, topic_prefix: str
) -> None:
    """A probe's second `replay --run-id R` of a payments topic failed: the resume check read a partition's
    dedupe window ('#dedupe:0') as if it were an entity's state record."""
    s = settings_for(topic_prefix, sqlite_store.url)
    s.labels_topic = f"{topic_prefix}-labels"
    payments = strip_labels(simulate_transactions(15, 10, seed=5)[0])
    resend = payments[-1]  # an at-least-once producer's resend: dropped, and counted in the summary
    produce(kafka_bootstrap, s.transactions_topic, [(p["customer_id"], p) for p in [*payments, resend]])
    produce(kafka_bootstrap, s.labels_topic, [])
    first = run_replay(s, kafka_bootstrap, [s.transactions_topic], run_id="pay-r", db=sqlite_store)
    assert first.scored == len(payments) and first.duplicates == 1
    rows = sqlite_store.load_states("pay-r", "transactions", ["#dedupe:0", "#dedupe:1", "#dedupe:2", "#dedupe:3"])
    assert rows, "the partition rows the check must skip are there"
    again = run_replay(s, kafka_bootstrap, [s.transactions_topic], run_id="pay-r", db=sqlite_store)
    assert again.resumed and again.scored == 0


def test_a_replay_that_reads_nothing_says_its_run_holds_nothing(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """It printed a summary and exit 0, and the next `replay --diff` said "no run", which reads as a typo."""
    from pipeline.kafka.client import ensure_topics

    topic = f"{topic_prefix}-empty"
    ensure_topics(kafka_bootstrap, [topic], 2)
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}", "KAFKA_BOOTSTRAP": kafka_bootstrap}
    cmd = [sys.executable, "-m", "pipeline", "replay"]
    done = subprocess.run(
        [*cmd, "--topic", topic, "--stream", "sensors", "--run-id", "empty"], env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "nothing was read, so run empty holds nothing" in done.stdout
    done = subprocess.run([*cmd, "--diff", "empty", "empty"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "a replay that read no event writes nothing" in done.stdout + done.stderr


def test_diff_compares_only_the_topics_both_runs_read(sqlite_store: SqlTestStore) -> None:
    """docs/replay.md's what-if of one topic, diffed against the live run, showed the live run's other stream's
    99 alerts as "removed" (found by probing, 2026-12-01)."""
    from datetime import datetime, timezone

    from pipeline.checkpointing.rows import AlertRow, OffsetRow

    def alert(run: str, topic: str, offset: int) -> AlertRow:
        return AlertRow(
            alert_key=f"{run}|{topic}|0|{offset}|m", run_id=run, stream=topic, entity_id="E1",
            event_time=datetime(2024, 1, 1, tzinfo=timezone.utc), score=9.0, threshold=1.0, severity="high",
            model_version="m", top_features=[], source_topic=topic, source_partition=0, source_offset=offset,
        )  # fmt: skip

    sqlite_store.write_checkpoint(
        "live", "g", [alert("live", "sensors", 5), alert("live", "tx", 7)], [],
        [OffsetRow("sensors", 0, 10), OffsetRow("tx", 0, 10)],
    )  # fmt: skip
    sqlite_store.write_checkpoint(
        "whatif", "replay", [alert("whatif", "sensors", 5)], [], [OffsetRow("sensors", 0, 10)]
    )
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "replay", "--diff", "live", "whatif"],
        env={**os.environ, "PIPELINE_DATABASE_URL": sqlite_store.url, "COLUMNS": "300"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "compared on the topics both runs read (sensors); left out, read by one run only: tx" in res.stdout
    assert "live -> whatif: 1 -> 1 alerts; +0 added (0 entities), -0 removed (0 entities), 1 in both" in res.stdout


def test_a_replay_of_a_topic_that_does_not_exist_fails_at_once(kafka_bootstrap: str, topic_prefix: str) -> None:
    """`pipeline replay --topic typo` waited the whole 30 s metadata probe before saying the topic does not
    exist; two fresh cluster metadata reads without it now settle it. A topic that exists is still found."""
    import time

    from pipeline.errors import BrokerError
    from pipeline.kafka.client import ensure_topics
    from pipeline.kafka.replay_source import ReplaySource

    src = ReplaySource(kafka_bootstrap)
    try:
        started = time.monotonic()
        with pytest.raises(BrokerError, match="does not exist"):
            src.subscribe([f"{topic_prefix}-typo"], lambda tps: None, lambda tps: None)
        assert time.monotonic() - started < 10
        ensure_topics(kafka_bootstrap, [f"{topic_prefix}-there"], 2)
        got: list[tuple[str, int]] = []
        src.subscribe([f"{topic_prefix}-there"], got.extend, lambda tps: None)
        assert got == [(f"{topic_prefix}-there", 0), (f"{topic_prefix}-there", 1)]
    finally:
        src.close()


def test_a_replay_that_scores_nothing_says_so_and_its_run_id_is_not_resumed(
    kafka_bootstrap: str, sqlite_store: SqlTestStore, topic_prefix: str
) -> None:
    """A probe: readings replayed as payments (--stream transactions) dead-lettered every record, exit 0; the
    same run id with the right stream then went on from the end and scored nothing ("0 events")."""
    s = settings_for(topic_prefix, sqlite_store.url)
    produce_sensors(kafka_bootstrap, s.sensors_topic, sensor_records(4, 20))
    env = {**os.environ, "DATABASE_URL": sqlite_store.url, "KAFKA_BOOTSTRAP": kafka_bootstrap, "COLUMNS": "300"}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "replay", "--topic", s.sensors_topic, "--stream", "transactions",
         "--run-id", "wrong"], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "run wrong: 80 events in range" in done.stdout and "0 scored" in done.stdout
    assert "every record read was dead-lettered" in done.stderr
    with pytest.raises(ConfigError, match="without scoring any of it .* pass a new --run-id"):
        run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="wrong", db=sqlite_store)
    right = run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="right", db=sqlite_store)
    assert right.scored == 80 and not right.all_dead_lettered


def test_a_resumed_replay_counts_the_records_it_scores_again_to_rebuild_state_apart(
    kafka_bootstrap: str, sqlite_store: SqlTestStore, topic_prefix: str
) -> None:
    """A probe: a replay interrupted before its first state snapshot resumed from offset 0 (state) with outputs
    durable further on; its summary counted those re-applied records as scored, after saying it would not."""
    s = settings_for(topic_prefix, sqlite_store.url)
    produce_sensors(kafka_bootstrap, s.sensors_topic, sensor_records(8, 30))
    full = run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="whole", db=sqlite_store)
    ends = {p: c for (t, p), (c, _) in sqlite_store.load_offsets("whole", REPLAY_GROUP).items()}
    # the interrupted run: half of every partition durable, no state snapshot yet
    half = [OffsetRow(s.sensors_topic, p, c // 2, None) for p, c in ends.items()]
    sqlite_store.write_checkpoint("cut", REPLAY_GROUP, [], [], half)
    res = run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="cut", db=sqlite_store)
    again = sum(r.committed_offset for r in half)
    assert res.resumed and res.rebuilt == again and res.scored == full.scored - again


def test_a_replay_stopped_by_a_signal_checkpoints_and_says_how_to_go_on(
    kafka_bootstrap: str, sqlite_store: SqlTestStore, topic_prefix: str
) -> None:
    """A probe: a replay started in the background by a script (SIGINT ignored there) could not be stopped
    with SIGINT, and SIGTERM killed it without a checkpoint. Both now stop it after the current batch."""
    import signal

    s = settings_for(topic_prefix, sqlite_store.url)
    produce_sensors(kafka_bootstrap, s.sensors_topic, sensor_records(4, 20))
    env = {**os.environ, "DATABASE_URL": sqlite_store.url, "KAFKA_BOOTSTRAP": kafka_bootstrap, "COLUMNS": "300"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "replay", "--topic", s.sensors_topic, "--stream", "sensors",
         "--run-id", "stopped"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = ""
    while "replay run id" not in seen:  # the handler is installed before this line is printed
        line = proc.stderr.readline()
        assert line, f"replay exited before starting: {proc.wait(30)}"
        seen += line
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted: `--run-id stopped` again goes on" in stderr and "Traceback" not in stderr
