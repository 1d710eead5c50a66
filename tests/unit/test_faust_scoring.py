"""pipeline.integrations.faust without a broker: FaustScoring.handle on real SQLite, batch by batch, equals
one StreamScorer run; a redelivered record is not applied twice; partitions that leave drop their state."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from models.lstm_ae import bundled_checkpoint_path, load_checkpoint
from pipeline.app import build_scorers
from pipeline.config import Settings
from pipeline.errors import ConfigError, SinkError
from pipeline.integrations.faust import FaustScoring
from pipeline.records import RawRecord
from pipeline.simulate import simulate_sensors, strip_labels
from tests.sql_helpers import SqlTestStore


class RecordingDeadLetters:
    """The DeadLetterSink protocol, kept in memory (the Kafka one is exercised by the integration test)."""

    def __init__(self) -> None:
        self.sent: list[tuple[RawRecord, str]] = []
        self.flushes = 0

    def send(self, record: RawRecord, reason: str, detail: str) -> None:
        self.sent.append((record, reason))

    def flush(self) -> None:
        self.flushes += 1


def _records(topic: str) -> list[RawRecord]:
    recs, _ = simulate_sensors(6, 120, seed=7, spike_devices=2, anomaly_len=12)
    offsets: dict[int, int] = {}
    out = []
    for r in strip_labels(recs):
        p = int(r["device_id"].split("-")[-1]) % 4
        off = offsets.get(p, 0)
        offsets[p] = off + 1
        out.append(RawRecord(topic, p, off, r["device_id"].encode(), orjson.dumps(r), 0))
    return out


def _scoring(tmp_path: Path, name: str) -> tuple[FaustScoring, SqlTestStore, RecordingDeadLetters]:
    s = Settings()
    s.device = "cpu"
    db = SqlTestStore(f"sqlite:///{tmp_path / name}.db")
    db.create_schema()
    dlq = RecordingDeadLetters()
    scorers = build_scorers(s, {"sensors": load_checkpoint(bundled_checkpoint_path("sensors"))})
    return FaustScoring(scorers, db, dlq, run_id=name), db, dlq


def test_batches_redelivery_and_dead_letters(tmp_path: Path) -> None:
    topic = Settings().sensors_topic
    recs = _records(topic)
    bad = RawRecord(topic, 0, 10_000, b"pump-x", b"{oops", 0)
    one, db1, _ = _scoring(tmp_path, "one")
    one.handle(recs)
    many, db2, dlq = _scoring(tmp_path, "many")
    for i in range(0, len(recs), 97):
        many.handle(recs[i : i + 97])
    many.handle(recs[300:400])  # redelivered after a rebalance: skipped, not applied twice
    many.handle([bad])
    assert many.stats.skipped_redelivered == 100
    assert [reason for _, reason in dlq.sent] == ["malformed_json"] and dlq.flushes == many.stats.batches

    def alerts(db: SqlTestStore, run: str) -> set[tuple[str, int, int, float]]:
        return {
            (a["entity_id"], a["source_partition"], a["source_offset"], round(a["score"], 6))
            for a in db.list_alerts(run_id=run)
        }

    assert alerts(db1, "one") and alerts(db1, "one") == alerts(db2, "many")
    assert many.stats.alerts == one.stats.alerts == len(alerts(db1, "one"))
    many.handle(recs[:50])  # written again if re-scored after a restart: the unique keys collapse them
    assert db2.count_alerts("many") == len(alerts(db1, "one"))


def test_a_partition_that_leaves_drops_its_state(tmp_path: Path) -> None:
    topic = Settings().sensors_topic
    scoring, _, _ = _scoring(tmp_path, "keep")
    scoring.handle(_records(topic))
    store = scoring.scorers[topic].store
    before = len(store)
    scoring.keep_partitions([(topic, 0), (topic, 1)])
    assert 0 < len(store) < before
    again = [r for r in _records(topic) if r.partition == 2][:5]
    scoring.handle(again)  # partition 2 came back: its records apply from a fresh state, not skipped
    assert scoring.stats.skipped_redelivered == 0


@pytest.mark.parametrize("feedback", [86400.0, None])
def test_terminal_context_models_are_refused(tmp_path: Path, feedback: float | None) -> None:
    """Per-terminal context (with or without label feedback) needs the processor's partition snapshots and
    its late-payment handling, which the in-memory faust path does not have."""
    from pipeline.features.streams import TransactionStream

    scoring, db, dlq = _scoring(tmp_path, "fb")
    scorer = next(iter(scoring.scorers.values()))
    scorer.spec = TransactionStream(terminal_context=True, fraud_feedback_tau_s=feedback)
    with pytest.raises(ConfigError, match="per-terminal context"):
        FaustScoring({"tx": scorer}, db, dlq)


def test_out_of_order_events_are_dead_lettered_not_scored(tmp_path: Path) -> None:
    """As in `pipeline run`: an event further behind its entity than the allowed lateness is dead-lettered
    as out_of_order, never counted as scored."""
    topic = Settings().sensors_topic
    recs = [r for r in _records(topic) if r.key == _records(topic)[0].key][:100]  # 1 s apart: 99 s of history
    scoring, _, dlq = _scoring(tmp_path, "late")
    scoring.handle(recs)
    assert recs[0].value is not None
    old = orjson.loads(recs[0].value)  # the entity's first reading, 99 s behind its latest (allowed: 60 s)
    stale = RawRecord(topic, recs[0].partition, recs[-1].offset + 1, recs[0].key, orjson.dumps(old), 0)
    scored_before = scoring.stats.scored
    scoring.handle([stale])
    assert [reason for _, reason in dlq.sent] == ["out_of_order"]
    assert scoring.stats.scored == scored_before and scoring.stats.dead_letters == 1


class FlakyStore:
    """The real SQLite store, whose first `failures` checkpoint writes fail as a locked database does."""

    def __init__(self, inner: SqlTestStore, failures: int) -> None:
        self.inner, self.failures, self.calls = inner, failures, 0

    def write_checkpoint(self, *args: object, **kwargs: object) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise SinkError("could not write the checkpoint: database unavailable: database is locked")
        return self.inner.write_checkpoint(*args, **kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_a_database_outage_holds_the_batch_until_its_alerts_are_durable(tmp_path: Path) -> None:
    """A probe locked the database under a faust worker: the agent raised, faust restarted it and committed
    the batch's offsets anyway, and its 18 alerts were never written. handle() now retries the writes with
    backoff and returns (faust acks) only once they are durable: the same alerts as without the outage."""
    topic = Settings().sensors_topic
    recs = _records(topic)
    one, db1, _ = _scoring(tmp_path, "one")
    one.handle(recs)
    calm, db2, dlq = _scoring(tmp_path, "calm")
    flaky = FlakyStore(db2, failures=3)
    held = FaustScoring(calm.scorers, flaky, dlq, run_id="calm", db_retry_max_s=0.01)  # type: ignore[arg-type]
    held.handle(recs)
    assert flaky.calls == 4 and dlq.flushes == 4  # the dead letters are flushed again with every try
    assert held.stats.alerts == one.stats.alerts == db2.count_alerts("calm") == db1.count_alerts("one") > 0


def test_the_readme_snippet_without_kafka_bootstrap_is_one_line() -> None:
    """A probe: the README's faust snippet with KAFKA_BOOTSTRAP unset ended in kafka-python's TypeError
    ('NoneType' object is not iterable) from the dead-letter producer."""
    from pipeline.errors import BrokerError
    from pipeline.kafka.client import KafkaDeadLetterSink

    with pytest.raises(BrokerError, match="the dead-letter producer needs a broker: set KAFKA_BOOTSTRAP"):
        KafkaDeadLetterSink(None, "dlq")
