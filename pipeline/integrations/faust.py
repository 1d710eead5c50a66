"""Per-entity LSTM scoring inside a faust-streaming app (`pip install 'streaming-anomaly-pipeline[faust]'`).

    app = faust.App("payments", broker="kafka://localhost:9092", web_enabled=False)
    settings = Settings()
    scorers = build_scorers(settings, ensure_models(settings))          # pipeline.app, as `pipeline run`
    db = Database(settings.database_url)                               # pipeline.sinks
    db.create_schema()                                                 # migrations, as `pipeline run` does
    scoring = FaustScoring(scorers, SqlCheckpointStore(db), KafkaDeadLetterSink(settings.kafka_bootstrap,
                           settings.dlq_topic), run_id="faust", max_future_s=settings.max_future_s,
                           db_retry_max_s=settings.db_retry_max_s)
    scoring_agent(app, scoring)                                        # one agent over the scorers' topics

Each `stream.take_events(batch, within)` batch goes through the same code as `pipeline run`: decode and
validate with the stream's spec (bad records to the dead-letter sink with a reason), `StreamScorer.process`,
`build_alerts`, and the alerts go to the same SQL table with the same unique keys (ON CONFLICT DO NOTHING).
Order per batch: dead letters flushed, alerts committed to the database, and only then does faust ack the
events (take_events acks after the loop body), so faust commits no offset before its outputs are durable;
while the database or the broker fails, the writes are retried with backoff and the batch waits.

What this path does NOT give (use `pipeline run` where it matters; docs/design/processor-choice.md):
* Per-entity state is in memory, per worker, and not durable. After a restart, or when a rebalance moves a
  partition, its entities start over: windows refill (no alert before `min_history` events), scaling
  restarts from the training prior and thresholds from the global one until warm. Alerts stay
  at-least-once and idempotent, but the ones an interrupted run raises may differ from an uninterrupted
  run's (measured: a kill -9 at half of a 12,000-event stream, then a restart, missed 17 of 96 alerts;
  docs/design/processor-choice.md). `pipeline run` snapshots state with its offsets in one transaction and
  replays to them instead.
* No label feedback: a transactions model that reads `terminal_fraud_risk` needs the processor's
  event-time alignment of the labels topic, so it is refused here.
* No incident lifecycle / alerts topic (the outbox runs in the processor's checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import metrics
from pipeline.checkpointing.protocols import CheckpointStore
from pipeline.checkpointing.rows import AlertRow
from pipeline.config import Settings
from pipeline.errors import ConfigError, DecodeError
from pipeline.features.streams import DecodedRecord, TransactionStream
from pipeline.processing.alerts import build_alerts
from pipeline.processing.dead_letters import out_of_order_detail
from pipeline.processing.decode import future_detail, future_horizon, validate
from pipeline.processing.retry import DbRetry
from pipeline.records import DeadLetterSink, RawRecord, TopicPartition
from pipeline.scoring.scorer import StreamScorer

log = logging.getLogger(__name__)


@dataclass
class FaustStats:
    events: int = 0
    scored: int = 0
    dead_letters: int = 0
    alerts: int = 0
    alerts_inserted: int = 0
    batches: int = 0
    skipped_redelivered: int = 0
    busy_s: float = 0.0  # time spent inside handle() (decode, score, sinks)
    first_batch_at: float | None = None  # wall clock (time.time) when the first batch arrived
    last_batch_done_at: float | None = None  # wall clock when the last batch's outputs were durable


class FaustScoring:
    """The framework-free part: a batch of raw records in, alerts durable in SQL out (synchronous)."""

    def __init__(
        self,
        scorers: Mapping[str, StreamScorer],
        db: CheckpointStore,
        dlq: DeadLetterSink,
        *,
        run_id: str = "faust",
        group_id: str = "faust",
        top_features: int = 3,
        max_future_s: float = Settings.model_fields["max_future_s"].default,
        db_retry_max_s: float = Settings.model_fields["db_retry_max_s"].default,
    ) -> None:
        """max_future_s, db_retry_max_s: pass the Settings' (PIPELINE_MAX_FUTURE_S, PIPELINE_DB_RETRY_MAX_S)."""
        for topic, scorer in scorers.items():
            spec = scorer.spec
            if isinstance(spec, TransactionStream) and spec.terminal_context:
                raise ConfigError(
                    f"{topic}: model {scorer.model_version} reads per-terminal context (and label "
                    "feedback, if any), which needs the processor's per-partition snapshots, its "
                    "late-payment handling and the labels topic's event-time alignment; serve it with "
                    "`pipeline run`"
                )
        self.scorers, self.db, self.dlq = dict(scorers), db, dlq
        self.run_id, self.group_id, self.top_features = run_id, group_id, top_features
        self.max_future_s = max_future_s
        self._retry = DbRetry(db_retry_max_s)
        self.stats = FaustStats()
        self._next_offset: dict[TopicPartition, int] = {}
        self._lock = threading.Lock()  # a batch and a rebalance never touch the state at the same time

    @property
    def topics(self) -> list[str]:
        return list(self.scorers)

    def handle(self, records: Sequence[RawRecord]) -> list[AlertRow]:
        """Decode, score and persist one batch; returns its alerts (already committed to the database)."""
        with self._lock:
            return self._handle(records)

    def _handle(self, records: Sequence[RawRecord]) -> list[AlertRow]:
        t0 = time.perf_counter()
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = time.time()
        by_topic: dict[str, list[RawRecord]] = defaultdict(list)
        for r in self._drop_redelivered(records):
            by_topic[r.topic].append(r)
        alerts: list[AlertRow] = []
        events = 0
        for topic, recs in by_topic.items():
            scorer = self.scorers.get(topic)
            if scorer is None:
                continue
            good: list[DecodedRecord] = []
            good_recs: list[RawRecord] = []
            horizon = future_horizon(self.max_future_s)
            for r in recs:
                try:
                    rec = validate(scorer.spec, r)
                except DecodeError as exc:
                    self._dead_letter(r, exc.reason, exc.detail)
                    continue
                if rec.timestamp > horizon:  # as pipeline run: a wrong clock must not move the entity's time
                    self._dead_letter(r, "from_the_future", future_detail(rec.timestamp, self.max_future_s))
                    continue
                good.append(rec)
                good_recs.append(r)
            events += len(recs)
            metrics.EVENTS.labels(scorer.spec.name).inc(len(recs))
            if not good:
                continue
            parts = np.fromiter((r.partition for r in good_recs), np.int32, len(good_recs))
            cols = scorer.spec.columns(good, parts)
            res = scorer.process(cols, parts)
            ts = cols.ts
            if res.rejected is not None and res.rejected.any():  # out of order: dead-lettered, as `pipeline run`
                for i in np.flatnonzero(res.rejected).tolist():
                    detail = out_of_order_detail(float(ts[i]), scorer.allowed_lateness_s)
                    self._dead_letter(good_recs[i], "out_of_order", detail)
                keep = np.flatnonzero(~res.rejected)
                good_recs, ts, res = [good_recs[i] for i in keep.tolist()], ts[keep], res.take(keep)
            if res.late is not None:
                metrics.LATE_EVENTS.labels(scorer.spec.name).inc(int(res.late.sum()))
            self.stats.scored += len(good_recs)
            metrics.SCORED.labels(scorer.spec.name).inc(len(good_recs))
            alerts.extend(build_alerts(self.run_id, scorer, good_recs, ts, res, self.top_features))
        self._make_durable(alerts)
        self.stats.alerts += len(alerts)
        self.stats.batches += 1
        self.stats.busy_s += time.perf_counter() - t0
        self.stats.last_batch_done_at = time.time()
        self.stats.events += events  # last: a reader that sees the events counted sees the batch's outputs
        return alerts

    def _make_durable(self, alerts: list[AlertRow]) -> None:
        """Dead letters flushed, then the alerts committed, before the batch is acked; retried with backoff (cap
        db_retry_max_s) while the database or the broker fails, by the processing path's own DbRetry. An error
        raised out of the agent instead made faust restart it and commit the batch's offsets anyway: a probe's
        locked database lost that batch's 18 alerts for good. The batch's state is already applied, so only
        the writes are repeated (idempotent: the alerts' unique keys)."""

        def write() -> None:
            self.dlq.flush()
            if alerts:
                self.stats.alerts_inserted += self.db.write_checkpoint(self.run_id, self.group_id, alerts, [], [])

        self._retry("make a faust batch's dead letters and alerts durable (its events are NOT acked)", write)

    def _dead_letter(self, r: RawRecord, reason: str, detail: str) -> None:
        self.dlq.send(r, reason, detail)
        self.stats.dead_letters += 1
        metrics.DLQ.labels(r.topic, reason).inc()

    def keep_partitions(self, assigned: Iterable[TopicPartition]) -> None:
        """Forget the state of partitions this worker no longer owns (in-memory state is not handed over)."""
        with self._lock:
            self._keep(set(assigned))

    def _keep(self, keep: set[TopicPartition]) -> None:
        for topic, scorer in self.scorers.items():
            held = {p for (t, p) in self._next_offset if t == topic}
            for p in sorted(held - {p for t, p in keep if t == topic}):
                scorer.store.drop_partition(p)
                self._next_offset.pop((topic, p), None)
                log.info("partition %s[%d] left this worker: its in-memory entity state is dropped", topic, p)

    def _drop_redelivered(self, records: Sequence[RawRecord]) -> list[RawRecord]:
        """A record below a partition's applied position (redelivered after a rebalance, before faust committed
        it) is not applied to state twice; its alert, if any, was written already."""
        out = []
        for r in records:
            tp = (r.topic, r.partition)
            if r.offset < self._next_offset.get(tp, -1):
                self.stats.skipped_redelivered += 1
                continue
            self._next_offset[tp] = r.offset + 1
            out.append(r)
        return out


def raw_record(event: Any) -> RawRecord:
    """A faust event's message as this project's broker-neutral record (the original bytes, not faust's
    decoded value, so the stream spec decides what is valid)."""
    m = event.message
    return RawRecord(m.topic, m.partition, m.offset, m.key, m.value, int(round((m.timestamp or 0.0) * 1000)))


def scoring_agent(
    app: Any, scoring: FaustScoring, *, batch: int = 1000, within: float = 0.1, name: str = "pipeline-scoring"
) -> Any:
    """Register a faust agent on the scorers' topics (raw bytes: the spec decodes, faust does not) that feeds
    `take_events(batch, within)` batches to `scoring.handle` in a worker thread (the event loop keeps
    heartbeating while the LSTM runs). One agent instance (concurrency 1): the scorers' state is not
    thread-safe. Returns the agent."""
    # raw codecs spelled out: value_type=bytes alone still decodes with the app's default (json), and one
    # malformed value then stalled the stream silently (measured on Tansu) instead of being dead-lettered
    topic = app.topic(*scoring.topics, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    async def on_assigned(sender: Any, assigned: Any, **_: Any) -> None:
        await asyncio.to_thread(scoring.keep_partitions, [(tp.topic, tp.partition) for tp in assigned])

    app.on_partitions_assigned.connect(on_assigned, weak=False)

    async def score(stream: Any) -> None:
        async for events in stream.take_events(batch, within=within):
            await asyncio.to_thread(scoring.handle, [raw_record(e) for e in events])

    return app.agent(topic, name=name, concurrency=1)(score)
