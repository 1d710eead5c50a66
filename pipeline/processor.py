"""The stream processor core: Source -> decode/validate -> per-entity state -> batched scoring ->
threshold -> alerts -> checkpoint. Knows Kafka only through pipeline.records.Source.

Label feedback (optional, for transactions models that read `terminal_fraud_risk`): a labels topic with
the transactions topic's partition count, assigned together with it (partition p of both to one worker).
Labels are queued in partition p's terminal context and applied once p's payments reach the label's time.
Payments wait until p's labels have been read past their time (event-time alignment), so features do not
depend on which topic a poll returned first. Neither position passes a record not yet applied, and a labels
partition is snapshotted together with the transactions partition whose context holds its labels, so a
restart re-reads exactly the labels the restored context lacks.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import orjson

from pipeline import metrics
from pipeline.checkpointing import Checkpointer
from pipeline.checkpointing.rows import AlertRow, StateRow
from pipeline.errors import CheckpointError, DecodeError, OffsetResetError, PipelineError, SinkError, StateError
from pipeline.features.streams import LabelStream, StreamSpec, TransactionStream
from pipeline.records import DeadLetterSink, RawRecord, Source, TopicPartition
from pipeline.scoring.scorer import ScoreBatch, StreamScorer
from pipeline.sinks.sql import SqlStore

log = logging.getLogger(__name__)
_gc_frozen = False
OFFSET_RESET_POLICIES = ("earliest", "latest", "fail")


class ProcessorStopped(PipelineError):
    """Asked to stop while waiting for the database mid-batch: exit without a checkpoint (replayed later)."""


def context_key(partition: int) -> str:
    """entity_state key of a partition's terminal context ('#' is never the first character of an entity id)."""
    return f"#terminals:{partition}"


def dedupe_key(partition: int) -> str:
    """entity_state key of a partition's recent transaction ids (see RecentIds)."""
    return f"#dedupe:{partition}"


class RecentIds:
    """The last `cap` transaction ids of one partition, oldest first: at-least-once producers resend a payment
    (same transaction_id) after a lost ack; a resend inside this window is dropped, not scored twice. Held in
    the partition state and snapshotted with it, so a replay after a restart drops the same resends."""

    def __init__(self, cap: int, ids: Sequence[str] = ()) -> None:
        self.cap = cap
        self.order: deque[str] = deque(ids[-cap:] if cap else ())
        self.ids = set(self.order)

    def seen(self, tid: str) -> bool:
        """True if `tid` is in the window; else remember it (forgetting the oldest beyond `cap`)."""
        if tid in self.ids:
            return True
        self.order.append(tid)
        self.ids.add(tid)
        if len(self.order) > self.cap:
            self.ids.discard(self.order.popleft())
        return False

    def snapshot(self) -> bytes:
        return orjson.dumps(list(self.order))

    @classmethod
    def restore(cls, cap: int, blob: bytes | None) -> RecentIds:
        ids = orjson.loads(blob) if blob else []
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise StateError("dedupe window snapshot is not a list of transaction ids")
        return cls(cap, ids)


def _nothing() -> None:
    pass


class _StageFailed(Exception):
    """A stage raised for a (sub-)batch whose state changes were undone: the caller splits and retries."""

    def __init__(self, stage: str, exc: Exception) -> None:
        super().__init__(stage)
        self.stage, self.exc = stage, exc


def failure_detail(stage: str, exc: BaseException) -> str:
    """Dead-letter detail of a record that made a processing stage raise: the stage and the error."""
    return f"stage={stage}: {type(exc).__name__}: {str(exc)[:300]}"


def freeze_gc() -> None:
    """Move everything alive now (torch, models, libraries, settings) out of the cyclic collector's reach.

    The hot path allocates many short-lived container objects (records, decoded events); every few hundred
    allocations CPython runs a collection, and the older generations re-scan the whole long-lived heap.
    Measured on the bench's paced 20k/s run: 8.2 s of 38 s in the collector without this, ~1 s with it.
    Once per process: later objects are collected as usual (gc.freeze only exempts what is alive now).
    """
    global _gc_frozen
    if _gc_frozen:
        return
    gc.collect()
    gc.freeze()
    _gc_frozen = True


def severity(score: float, threshold: float) -> str:
    ratio = score / threshold if threshold > 0 else float("inf")
    if ratio < 1.5:
        return "low"
    if ratio < 3.0:
        return "medium"
    if ratio < 10.0:
        return "high"
    return "critical"


def validate(spec: StreamSpec, r: RawRecord) -> Any:
    """The validated record; DecodeError (with the dead-letter reason) for bad bytes or a key that is not
    the record's entity (state locality depends on entity-keyed partitions: an unkeyed record lands on any
    partition, so it is refused as missing_key)."""
    rec = spec.decode(require_key(spec, r))
    check_key(spec, r, rec)
    return rec


def require_key(spec: StreamSpec, r: RawRecord) -> bytes | None:
    """The record's value, if the record has a key."""
    if r.key is None:
        raise DecodeError("missing_key", f"records must be keyed by {spec.entity_field}")
    return r.value


def check_key(spec: StreamSpec, r: RawRecord, rec: Any) -> None:
    if r.key is None or r.key.decode("utf-8", "replace") != spec.entity_of(rec):
        raise DecodeError("key_mismatch", f"key {(r.key or b'')[:80]!r} != {spec.entity_field}")


def out_of_order_detail(ts: float, scorer: StreamScorer) -> str:
    """Dead-letter detail of an event further behind its entity than the scorer's allowed lateness."""
    when = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()
    return (
        f"event time {when} is more than allowed_lateness_s={scorer.allowed_lateness_s} behind its "
        "entity's latest event"
    )


def build_alerts(
    run_id: str,
    scorer: StreamScorer,
    recs: Sequence[RawRecord],
    ts: np.ndarray,
    res: ScoreBatch,
    top_features: int = 3,
    tag: Callable[[TopicPartition], str] | None = None,
) -> list[AlertRow]:
    """Alert rows for a scored batch; the key (run, source position, model version) makes re-inserts of a
    replayed record collapse in the sink. Shared by the processor and pipeline.integrations.faust.
    tag(tp): the partition's log-epoch suffix when the alert is built (PartitionPositions.tag): a record of a
    reset log reuses an old record's offset, its key must not collide with the old record's alert."""
    spec, version = scorer.spec, scorer.model_version
    out = []
    for i in np.flatnonzero(res.is_anomaly):
        r = recs[int(i)]
        top = np.argsort(-res.contributions[i])[:top_features]
        suffix = tag((r.topic, r.partition)) if tag is not None else ""
        out.append(
            AlertRow(
                alert_key=f"{run_id}|{r.topic}|{r.partition}|{r.offset}|{version}{suffix}",
                run_id=run_id,
                stream=spec.name,
                entity_id=res.entity_ids[i],
                event_time=datetime.fromtimestamp(float(ts[i]), tz=timezone.utc),
                score=float(res.scores[i]),
                threshold=float(res.thresholds[i]),
                severity=severity(float(res.scores[i]), float(res.thresholds[i])),
                model_version=version,
                top_features=[
                    {
                        "feature": spec.feature_names[j],
                        "observed": float(res.observed[i, j]),
                        "reconstructed": float(res.reconstructed[i, j]),
                        "contribution": float(res.contributions[i, j]),
                    }
                    for j in top
                ],
                source_topic=r.topic,
                source_partition=r.partition,
                source_offset=r.offset,
            )
        )
    return out


@dataclass
class ProcessorStats:
    events: int = 0
    scored: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    alerts: int = 0
    alerts_by_stream: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    checkpoints: int = 0
    db_failures: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class ProcessorOptions:
    run_id: str = "live"
    group_id: str = "anomaly-pipeline"
    max_batch_records: int = 5000
    poll_timeout_ms: int = 50
    commit_interval_ms: int = 200
    snapshot_interval_s: float = 10.0
    entity_ttl_s: float = 3600.0
    max_live_entities: int = 1_000_000
    db_retry_max_s: float = 30.0
    offset_reset: str = "earliest"  # stored position outside the log: earliest | latest | fail
    dedupe_window: int = 10_000  # transaction ids remembered per partition (0 = no deduplication)
    top_features: int = 3
    freeze_gc: bool = True  # see freeze_gc()


class Processor:
    def __init__(
        self,
        source: Source,
        db: SqlStore,
        dlq: DeadLetterSink,
        scorers: dict[str, StreamScorer],  # topic -> scorer
        options: ProcessorOptions = ProcessorOptions(),
        after_durable: Callable[[list[AlertRow]], None] | None = None,
        label_topics: dict[str, str] | None = None,  # labels topic -> the transactions topic it feeds
    ) -> None:
        self.source, self.db, self.dlq, self.scorers, self.opt = source, db, dlq, scorers, options
        self.label_topics = dict(label_topics or {})
        self._label_spec = LabelStream()
        self._label_read: dict[TopicPartition, int] = {}  # labels partition -> next offset after the last read
        self._label_watermark: dict[TopicPartition, float] = {}  # labels partition -> latest labelled_at read
        self._fed_by = {fed: labels for labels, fed in self.label_topics.items()}  # transactions -> labels topic
        self._held: dict[TopicPartition, deque[tuple[RawRecord, Any]]] = {}  # payments waiting for labels
        self._paused: set[TopicPartition] = set()
        self._assigned: set[TopicPartition] = set()
        self.stats = ProcessorStats()
        self.recovery_until: dict[TopicPartition, int] = {}
        self.checkpointer = Checkpointer(
            db,
            source,
            dlq,
            run_id=options.run_id,
            group_id=options.group_id,
            collect_states=self._collect_states,
            after_durable=after_durable,
            snapshot_unit=self._snapshot_unit,
            db_retry=self.db_retry,
        )
        for topic, scorer in scorers.items():
            scorer.store.loader = self._loader_for(scorer.spec.name)
            if isinstance(scorer.spec, TransactionStream) and scorer.spec.terminal_context:
                scorer.spec.context_loader = self._context_loader_for(topic, scorer.spec.name)
        for labels, fed in self.label_topics.items():
            spec = scorers[fed].spec if fed in scorers else None
            if not (isinstance(spec, TransactionStream) and spec.label_feedback):
                raise ValueError(
                    f"labels topic {labels!r} feeds {fed!r}, which is not a transactions stream "
                    "whose model reads label feedback"
                )
        self._max_event_ts = 0.0
        self.ready = threading.Event()  # partitions assigned and the database reachable (/readyz)
        self._stop = threading.Event()  # set by run()'s caller: ends database waits
        self._assign_error: Exception | None = None
        self._to_latest: set[TopicPartition] = set()  # skip to the log end once it is known (policy latest)
        self._next_offset: dict[TopicPartition, int] = {}  # records below this were applied already
        self._recent: dict[TopicPartition, RecentIds] = {}  # transactions partition -> its dedupe window
        self._snapshot_due: dict[TopicPartition, float] = {}  # monotonic time each partition's snapshot is due

    # -- partitions ---------------------------------------------------------------------------------
    def db_retry(self, what: str, call: Callable[[], Any]) -> Any:
        """`call()` (a database read on the processing path), retried with the checkpoints' backoff while
        the database is unavailable; meanwhile the processor reports not ready. Raises ProcessorStopped
        when asked to stop while waiting (nothing half-applied is committed: the batch is replayed)."""
        delay, was_ready = 0.2, self.ready.is_set()
        try:
            while True:
                try:
                    return call()
                except SinkError as exc:
                    self.stats.db_failures += 1
                    metrics.DB_FAILURES.inc()
                    self.ready.clear()
                    log.warning(
                        "cannot %s (database unavailable?); retrying in %.1fs: %s",
                        what,
                        delay,
                        str(exc).splitlines()[0],
                    )
                    if self._stop.wait(delay):
                        raise ProcessorStopped(f"stopped while waiting to {what}") from exc
                    delay = min(delay * 2, self.opt.db_retry_max_s)
        finally:
            if was_ready:
                self.ready.set()

    def _loader_for(self, stream: str) -> Callable[[Sequence[str]], dict[str, bytes]]:
        return lambda ids: self.db_retry(
            f"load {len(ids)} {stream} entity states", lambda: self.db.load_states(self.opt.run_id, stream, ids)
        )

    def _context_loader_for(self, topic: str, stream: str) -> Callable[[int], bytes | None]:
        def load(partition: int) -> bytes | None:
            key = context_key(partition)
            blob = self.db_retry(
                f"load the terminal context of {topic}[{partition}]",
                lambda: self.db.load_states(self.opt.run_id, stream, [key]),
            ).get(key)
            if blob is None and self.checkpointer.positions.snapshot.get((topic, partition)) is not None:
                raise StateError(
                    f"{topic}[{partition}] has a state snapshot but no terminal context (written by a "
                    "model without terminal features?); use a new run id for this model"
                )
            return blob

        return load

    def _load_offsets(self) -> dict[TopicPartition, tuple[int, int | None]]:
        """Positions must come from the database: without them state would restart from the wrong place,
        so a database outage during assignment is waited out (the heartbeat thread keeps us in the group)."""
        saved: dict[TopicPartition, tuple[int, int | None]] = self.db_retry(
            "read partition checkpoints", lambda: self.db.load_offsets(self.opt.run_id, self.opt.group_id)
        )
        return saved

    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        try:
            self._on_assigned(tps)
        except Exception as exc:
            self._assign_error = exc  # the Kafka client swallows listener errors: run() raises it after poll
            raise

    def _on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        self._assigned = set(tps)
        saved = self._load_offsets()
        epochs: dict[TopicPartition, int] = self.db_retry(
            "read partition epochs", lambda: self.db.load_epochs(self.opt.run_id, self.opt.group_id)
        )
        pos = self.checkpointer.positions
        for tp in tps:
            committed, snap = saved.get(tp, (None, None))
            if tp in epochs:
                pos.epoch[tp] = epochs[tp]
            if committed is None:
                committed = self.source.committed(tp)
            # no snapshot yet: rebuild state from the start, even if outputs were committed
            start = snap if snap is not None else 0
            if snap is not None or committed is not None:
                start = self._check_log_start(tp, start, committed)
            self.source.seek(tp, start)
            self.recovery_until[tp] = committed or 0
            self._next_offset[tp] = start
            if committed is not None:
                pos.committed[tp] = committed
            if snap is not None:
                pos.snapshot[tp] = snap
            log.info("assigned %s[%d]: resume state from %d, outputs durable up to %s", tp[0], tp[1], start, committed)
        # stagger state snapshots over the interval: one partition's entities per checkpoint, not all at once.
        # A labels partition is never snapshotted on its own, only with its transactions partition.
        now, every = time.monotonic(), self.opt.snapshot_interval_s
        ordered = sorted(tp for tp in tps if tp[0] not in self.label_topics)
        self._check_copartitioned(tps)
        self._snapshot_due = {tp: now + every * (i + 1) / len(ordered) for i, tp in enumerate(ordered)}
        self.ready.set()

    def _snapshot_unit(self, tp: TopicPartition) -> set[TopicPartition]:
        """A transactions partition and its labels partition are only snapshotted together."""
        fed = self.label_topics.get(tp[0])
        if fed is not None:
            return {tp, (fed, tp[1])}
        labels = self._fed_by.get(tp[0])
        return {tp} if labels is None else {tp, (labels, tp[1])}

    # -- offset reset: the broker's log no longer holds the stored position ---------------------------
    def _offset_reset(self, tp: TopicPartition, stored: int, lo: int | None, hi: int | None, why: str) -> str:
        """Log the ERROR, count it, and return the policy to apply (raises OffsetResetError for 'fail')."""
        policy = self.opt.offset_reset
        metrics.OFFSET_RESETS.labels(tp[0], why).inc()
        log.error(
            "%s[%d]: stored position %d is %s of the broker's log [%s, %s) (topic recreated, broker lost "
            "its log, or retention/truncation); offset reset policy %r (PIPELINE_OFFSET_RESET)",
            tp[0],
            tp[1],
            stored,
            why,
            "?" if lo is None else lo,
            "?" if hi is None else hi,
            policy,
        )
        if policy == "fail":
            raise OffsetResetError(
                f"{tp[0]}[{tp[1]}]: stored position {stored} is {why} of the broker's log "
                f"[{lo}, {hi}); PIPELINE_OFFSET_RESET=fail"
            )
        return policy

    def _log_start(self, tp: TopicPartition) -> int | None:
        start_of = getattr(self.source, "log_start", None)
        return None if start_of is None else start_of(tp)

    def _check_log_start(self, tp: TopicPartition, start: int, committed: int | None) -> int:
        """Where to resume a partition whose replay would start before the log's first record. The policy is
        for a durable position the log no longer holds (records never processed are gone); when only the
        state snapshot is older than the log's start (ordinary retention), state is rebuilt from what the log
        still has and every unprocessed record is still read."""
        lo = self._log_start(tp)
        if lo is None or start >= lo:
            return start
        durable = committed if committed is not None else start
        if durable >= lo:
            log.warning(
                "%s[%d]: state snapshot position %d is before the broker's log start %d (retention); "
                "rebuilding state from %d (partial history), outputs durable up to %d",
                tp[0],
                tp[1],
                start,
                lo,
                lo,
                durable,
            )
            return lo
        if self._offset_reset(tp, durable, lo, None, "before the start") == "latest":
            self._to_latest.add(tp)  # the end is known after the first fetch (Tansu's ListOffsets is wrong)
        return lo  # state replays what the log still has; the positions only move forwards

    def _check_log_ends(self, records: list[RawRecord]) -> list[RawRecord]:
        """After each fetch: a log whose end is below our position was reset (memory broker restarted,
        topic recreated). Apply the policy; records fetched at the old position are dropped (re-read)."""
        hw_of = getattr(self.source, "highwater", None)
        if hw_of is None:
            return records
        pos = self.checkpointer.positions
        moved: set[TopicPartition] = set()
        for tp in self._assigned:
            try:
                hw = hw_of(tp)
            except Exception:  # noqa: BLE001 - not assigned in the client (mid-rebalance): next poll
                continue
            if hw is None:
                continue
            if tp in self._to_latest:
                self._to_latest.discard(tp)
                self._jump(tp, max(hw, self._next_offset.get(tp, 0)))
                moved.add(tp)
                continue
            stored = max(self._next_offset.get(tp, 0), pos.committed.get(tp, 0))
            if hw < stored:
                lo = self._log_start(tp) or 0
                policy = self._offset_reset(tp, stored, lo, hw, "past the end")
                self._rewind(tp, hw if policy == "latest" else lo)
                moved.add(tp)
        if not moved:
            return records
        return [r for r in records if (r.topic, r.partition) not in moved]

    def _jump(self, tp: TopicPartition, offset: int) -> None:
        """Skip forward to `offset` (policy latest): positions move forwards only."""
        self.source.seek(tp, offset)
        self._next_offset[tp] = offset
        self._held.pop(tp, None)
        self.checkpointer.positions.advance(tp, offset)

    def _rewind(self, tp: TopicPartition, offset: int) -> None:
        """The log restarted below our position: read it from `offset` as new records (positions written
        lower, with a state snapshot; dead letters and incidents of the new records are not suppressed)."""
        self.source.seek(tp, offset)
        self._next_offset[tp] = offset
        self.recovery_until[tp] = offset
        self._held.pop(tp, None)
        if tp in self._label_read:
            self._label_read[tp] = offset
        self.checkpointer.positions.rewind(tp, offset)

    def _check_copartitioned(self, tps: Sequence[TopicPartition]) -> None:
        """Labels reach a payment's context only if this worker owns both partition p's: the range assignor
        (kafka-python's default) guarantees it when both topics have the same number of partitions."""
        have = set(tps)
        for labels, fed in self.label_topics.items():
            lone = sorted({p for t, p in have if t == labels} ^ {p for t, p in have if t == fed})
            if lone:
                log.error(
                    "partitions %s of %s / %s are not assigned together: labels of those partitions cannot "
                    "reach their payments (are the topics' partition counts equal, is the range assignor "
                    "in use?)",
                    lone,
                    fed,
                    labels,
                )

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        if not tps:
            return
        try:
            self.checkpointer.checkpoint(snapshot=True)
        except CheckpointError as exc:
            # not committed: the next owner replays the revoked partitions from their last durable checkpoint.
            # Alerts of partitions we keep stay pending for our next checkpoint.
            log.warning("checkpoint on revoke failed (%s); partitions will be replayed by their next owner", exc)
            revoked = set(tps)
            self.checkpointer.pending = [
                a for a in self.checkpointer.pending if (a.source_topic, a.source_partition) not in revoked
            ]
        for tp in tps:
            scorer = self.scorers.get(tp[0])
            if scorer is not None:
                scorer.store.drop_partition(tp[1])
                if isinstance(scorer.spec, TransactionStream):
                    scorer.spec.drop_partition(tp[1])  # its queued labels go too: they are re-read
            self._label_read.pop(tp, None)
            self._label_watermark.pop(tp, None)
            self._held.pop(tp, None)  # not committed past: the next owner reads them again
            self._paused.discard(tp)
            self._assigned.discard(tp)
            self.checkpointer.positions.forget(tp)
            self.recovery_until.pop(tp, None)
            self._next_offset.pop(tp, None)
            self._snapshot_due.pop(tp, None)
            self._recent.pop(tp, None)  # the next owner restores it with the partition's snapshot
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in tps))

    def _collect_states(self, tps: set[TopicPartition]) -> tuple[list[StateRow], Callable[[], None]]:
        rows: list[StateRow] = []
        to_clean: list[tuple[StreamScorer, np.ndarray]] = []
        for topic, scorer in self.scorers.items():
            for t, p in tps:
                if t != topic:
                    continue
                slots = scorer.store.dirty_slots(p)
                if len(slots) == 0:
                    continue
                blobs = scorer.store.snapshot(slots)
                ids = scorer.store.entity_ids(slots)
                rows.extend(StateRow(scorer.spec.name, e, t, p, b) for e, b in zip(ids, blobs, strict=True))
                to_clean.append((scorer, slots))
            spec = scorer.spec
            if isinstance(spec, TransactionStream):
                rows.extend(
                    StateRow(spec.name, context_key(p), t, p, spec.contexts[p].snapshot())
                    for t, p in tps
                    if t == topic and p in spec.contexts
                )
            rows.extend(
                StateRow(spec.name, dedupe_key(p), t, p, self._recent[(t, p)].snapshot())
                for t, p in tps
                if t == topic and (t, p) in self._recent
            )

        def mark_clean() -> None:
            for scorer, slots in to_clean:
                scorer.store.mark_clean(slots)

        return rows, mark_clean

    # -- records ------------------------------------------------------------------------------------
    def handle(self, records: Sequence[RawRecord]) -> None:
        by_topic: dict[str, list[RawRecord]] = defaultdict(list)
        for r in records:
            by_topic[r.topic].append(r)
        pos = self.checkpointer.positions
        for topic in self.label_topics:  # queue labels first: payments of this poll may already need them
            if topic in by_topic:
                self._read_labels(topic, by_topic.pop(topic))
        for topic, recs in by_topic.items():
            scorer = self.scorers.get(topic)
            if scorer is None:
                continue
            spec = scorer.spec
            good = []
            good_recs = []
            recs = self._drop_reapplied(recs)
            # payments held for their labels are deduplicated when released (_release): the dedupe window
            # holds no id above the partition's position, so a replay from a snapshot never drops them
            dedupe = self._dedupes(spec) and topic not in self._fed_by
            for r in recs:
                rec = self._decode(spec, r)
                if rec is not None:
                    if dedupe and self._duplicate(spec, r, rec):
                        continue
                    good.append(rec)
                    good_recs.append(r)
            self.stats.events += len(recs)
            metrics.EVENTS.labels(spec.name).inc(len(recs))
            if topic in self._fed_by:  # payments wait until their partition's labels have caught up with them
                good_recs, good = self._align(topic, recs, good_recs, good)
            else:
                for r in recs:
                    pos.advance((r.topic, r.partition), r.offset + 1)
            self._score(topic, scorer, good_recs, good)
        self._release_aligned()
        self._advance_label_positions()

    def _decode(self, spec: StreamSpec, r: RawRecord) -> Any | None:
        """The validated record, or None after dead-lettering it (not again below the durable position).
        Any error, not only a DecodeError, dead-letters this record alone (processing_error, with the stage)."""
        stage = "decode"
        try:
            rec = spec.decode(require_key(spec, r))
            stage = "key"
            check_key(spec, r, rec)
            return rec
        except DecodeError as exc:
            self._dead_letter(r, exc.reason, exc.detail)
        except PipelineError:
            raise  # raised on purpose for the operator (state, database, stop): not one record's fault
        except Exception as exc:  # noqa: BLE001 - one record must never stop the service
            self._processing_error(r, stage, exc)
        return None

    def _dead_letter(self, r: RawRecord, reason: str, detail: str) -> None:
        if r.offset >= self.recovery_until.get((r.topic, r.partition), 0):
            self.dlq.send(r, reason, detail)
            self.stats.dead_letters += 1
            metrics.DLQ.labels(reason).inc()

    def _processing_error(self, r: RawRecord, stage: str, exc: Exception) -> None:
        log.error(
            "%s[%d]@%d made stage %s raise; dead-lettered as processing_error: %s: %s",
            r.topic,
            r.partition,
            r.offset,
            stage,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self._dead_letter(r, "processing_error", failure_detail(stage, exc))

    def _dedupes(self, spec: StreamSpec) -> bool:
        return self.opt.dedupe_window > 0 and isinstance(spec, TransactionStream)

    def _incident_error(self, r: RawRecord, exc: Exception) -> None:
        """The record was scored (its alert, if any, stands) but its incident lifecycle update raised."""
        log.error(
            "%s[%d]@%d: incident lifecycle update raised; dead-lettered as incident_error (the alert "
            "stands, its incident was not updated): %s: %s",
            r.topic,
            r.partition,
            r.offset,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self._dead_letter(r, "incident_error", failure_detail("observe", exc))

    def _duplicate(self, spec: StreamSpec, r: RawRecord, rec: Any) -> bool:
        """A payment whose transaction_id is in its partition's dedupe window: dropped (counted, not scored)."""
        tp = (r.topic, r.partition)
        recent = self._recent.get(tp)
        if recent is None:
            recent = self._recent[tp] = self._load_recent(spec.name, tp)
        if not recent.seen(rec.transaction_id):
            return False
        if r.offset >= self.recovery_until.get(tp, 0):  # counted once, not again when a restart replays it
            self.stats.duplicates += 1
            metrics.DUPLICATES.labels(spec.name).inc()
        return True

    def _load_recent(self, stream: str, tp: TopicPartition) -> RecentIds:
        """The window as of the partition's state snapshot (state resumes there); empty without one."""
        if self.checkpointer.positions.snapshot.get(tp) is None:
            return RecentIds(self.opt.dedupe_window)
        key = dedupe_key(tp[1])
        blob = self.db_retry(
            f"load the dedupe window of {tp[0]}[{tp[1]}]", lambda: self.db.load_states(self.opt.run_id, stream, [key])
        ).get(key)
        return RecentIds.restore(self.opt.dedupe_window, blob)

    def _score(self, topic: str, scorer: StreamScorer, good_recs: list[RawRecord], good: list[Any]) -> None:
        """Score a batch. If featurizing or scoring raises, the batch's state changes are undone and its halves
        are retried, down to single records: a record that makes a stage raise is dead-lettered alone
        (processing_error, naming the stage) and every other record is scored exactly once. The happy path
        pays only the undo savepoint."""
        if not good:
            return
        try:
            self._score_batch(topic, scorer, good_recs, good)
        except _StageFailed as failed:
            if len(good) == 1:
                self._processing_error(good_recs[0], failed.stage, failed.exc)
                return
            mid = len(good) // 2
            self._score(topic, scorer, good_recs[:mid], good[:mid])
            self._score(topic, scorer, good_recs[mid:], good[mid:])

    def _score_batch(self, topic: str, scorer: StreamScorer, good_recs: list[RawRecord], good: list[Any]) -> None:
        spec = scorer.spec
        parts = np.fromiter((r.partition for r in good_recs), np.int32, len(good_recs))
        undo_contexts = self._context_savepoint(spec, parts)
        undo_state: Callable[[], None] = _nothing
        out_of_order: list[tuple[RawRecord, float]] = []
        stage = "featurize"
        try:
            cols = spec.columns(good, parts)
            stage = "score"
            undo_state = scorer.savepoint(cols.entity_ids, parts)
            res = scorer.process(cols, parts)
            if res.late is not None and isinstance(spec, TransactionStream) and spec.terminal_context:
                # featurizing folded late and out-of-order payments into their terminal context, which must stay
                # as if they had not come (as their customers' states do): undo the batch and re-run it without
                # the rejected ones, the late ones featurized from the context without being folded in. Rare:
                # only batches holding such payments pay a second pass.
                undo_state()
                undo_contexts()
                assert res.rejected is not None
                out_of_order = [(good_recs[i], float(cols.ts[i])) for i in np.flatnonzero(res.rejected).tolist()]
                keep = np.flatnonzero(~res.rejected)
                frozen = res.late[keep]
                good, good_recs, parts = (
                    [good[i] for i in keep.tolist()],
                    [good_recs[i] for i in keep.tolist()],
                    parts[keep],
                )
                undo_state = _nothing
                if good:
                    stage = "featurize"
                    cols = spec.columns(good, parts, frozen)
                    stage = "score"
                    undo_state = scorer.savepoint(cols.entity_ids, parts)
                    res = scorer.process(cols, parts)
        except PipelineError:
            undo_state()  # as process(atomic=True) did
            raise  # raised on purpose for the operator (state, database, stop): not one record's fault
        except Exception as exc:  # noqa: BLE001 - isolated by _score
            undo_state()
            undo_contexts()
            raise _StageFailed(stage, exc) from exc
        # the batch is applied to state now: later stages isolate failures per record and never re-score
        for r, t in out_of_order:
            self._dead_letter(r, "out_of_order", out_of_order_detail(t, scorer))
        if not good_recs:
            return
        ts = cols.ts
        if res.rejected is not None and res.rejected.any():  # behind their entity by more than allowed
            for i in np.flatnonzero(res.rejected).tolist():
                self._dead_letter(good_recs[i], "out_of_order", out_of_order_detail(float(ts[i]), scorer))
            keep = np.flatnonzero(~res.rejected)
            good_recs, parts, ts, res = [good_recs[i] for i in keep.tolist()], parts[keep], ts[keep], res.take(keep)
            if not good_recs:
                return
        if res.late is not None:
            metrics.LATE_EVENTS.labels(spec.name).inc(int(res.late.sum()))
        self.stats.scored += len(good_recs)
        metrics.SCORED.labels(spec.name).inc(len(good_recs))
        metrics.BATCH_FILL.observe(len(good_recs))
        self._max_event_ts = max(self._max_event_ts, float(ts.max()))
        try:
            failed = self.checkpointer.observe(topic, spec.name, good_recs, parts, ts, res)  # incident lifecycle
        except PipelineError:
            raise
        except Exception as batch_exc:  # noqa: BLE001 - outside the per-event loop: the whole batch's lifecycle
            failed = [(i, batch_exc) for i in range(len(good_recs))]
        for i, err in failed:
            self._incident_error(good_recs[i], err)
        tag = self.checkpointer.positions.tag  # the log epoch as the alert is built, as its incident's key
        try:
            alerts = build_alerts(self.opt.run_id, scorer, good_recs, ts, res, self.opt.top_features, tag)
        except Exception:  # noqa: BLE001 - a pure function: rebuild alert by alert to find the culprit
            alerts = []
            for i in np.flatnonzero(res.is_anomaly).tolist():
                only = np.zeros(len(good_recs), bool)
                only[i] = True
                try:
                    alerts += build_alerts(
                        self.opt.run_id,
                        scorer,
                        good_recs,
                        ts,
                        replace(res, is_anomaly=only),
                        self.opt.top_features,
                        tag,
                    )
                except Exception as exc:  # noqa: BLE001 - one record must never stop the service
                    self._processing_error(good_recs[i], "alert", exc)
        self.checkpointer.pending.extend(alerts)
        self.stats.alerts += len(alerts)
        self.stats.alerts_by_stream[spec.name] += len(alerts)

    def _context_savepoint(self, spec: StreamSpec, parts: np.ndarray) -> Callable[[], None]:
        """Undo for the terminal contexts a batch's featurization updates (transactions with terminal features)."""
        if not (isinstance(spec, TransactionStream) and spec.terminal_context):
            return lambda: None
        undo = [spec.context(p).savepoint() for p in np.unique(parts).tolist()]

        def restore() -> None:
            for u in undo:
                u()

        return restore

    # -- label feedback: event-time alignment ---------------------------------------------------------
    def _align(
        self, topic: str, recs: list[RawRecord], good_recs: list[RawRecord], good: list[Any]
    ) -> tuple[list[RawRecord], list[Any]]:
        """Hold payments (in log order) whose labels may not have been read yet; return those ready now."""
        for r, rec in zip(good_recs, good, strict=True):
            self._held.setdefault((r.topic, r.partition), deque()).append((r, rec))
        for r in recs:
            if (r.topic, r.partition) not in self._held:
                self._held[(r.topic, r.partition)] = deque()
        return self._release(topic)

    def _release(self, topic: str) -> tuple[list[RawRecord], list[Any]]:
        labels = self._fed_by[topic]
        pos = self.checkpointer.positions
        spec = self.scorers[topic].spec
        dedupe = self._dedupes(spec)
        out_recs: list[RawRecord] = []
        out: list[Any] = []
        for tp, queue in self._held.items():
            if tp[0] != topic:
                continue
            # a payment is ready once every label known by its time has been read: the labels partition is
            # read to its end, or past a label known later (labels are written in labelled_at order, as a live
            # feed is; one written out of order is applied late, never early)
            ltp = (labels, tp[1])
            if ltp not in self._assigned or self.source.caught_up(ltp):  # (not co-assigned: logged on assignment)
                ready = len(queue)
            else:
                mark = self._label_watermark.get(ltp, float("-inf"))
                ready = 0
                while ready < len(queue) and queue[ready][1].timestamp.timestamp() <= mark:
                    ready += 1
            for _ in range(ready):
                r, rec = queue.popleft()
                if dedupe and self._duplicate(spec, r, rec):
                    continue
                out_recs.append(r)
                out.append(rec)
            pos.advance(tp, queue[0][0].offset if queue else self._next_offset.get(tp, 0))
            cap = 2 * self.opt.max_batch_records  # bounded memory: stop fetching a partition that waits
            if len(queue) > cap and tp not in self._paused:
                self.source.pause(tp)
                self._paused.add(tp)
            elif len(queue) <= cap // 2 and tp in self._paused:
                self.source.resume(tp)
                self._paused.discard(tp)
        return out_recs, out

    def _release_aligned(self) -> None:
        for topic in self._fed_by:
            if any(q for (t, _), q in self._held.items() if t == topic):
                good_recs, good = self._release(topic)
                self._score(topic, self.scorers[topic], good_recs, good)

    @property
    def holding(self) -> int:
        """Payments read but waiting for their labels partition to catch up."""
        return sum(len(q) for q in self._held.values())

    def _read_labels(self, topic: str, recs: list[RawRecord]) -> None:
        """Decode labels (bad ones to the dead-letter topic) and queue them in their partition's context."""
        spec = self.scorers[self.label_topics[topic]].spec
        assert isinstance(spec, TransactionStream)
        recs = self._drop_reapplied(recs)
        queued: dict[int, tuple[list[int], list[str], list[float], list[float]]] = defaultdict(lambda: ([], [], [], []))
        for r in recs:
            self._label_read[(r.topic, r.partition)] = r.offset + 1
            lab = self._decode(self._label_spec, r)
            if lab is None:
                continue
            known = lab.labelled_at.timestamp()
            ltp = (r.topic, r.partition)
            self._label_watermark[ltp] = max(self._label_watermark.get(ltp, float("-inf")), known)
            q = queued[r.partition]
            q[0].append(r.offset)
            q[1].append(lab.terminal_id)
            q[2].append(known)
            q[3].append(1.0 if lab.is_fraud else 0.0)
        for p, (offsets, terminals, known, fraud) in queued.items():
            spec.context(p).add_labels(offsets, terminals, np.asarray(known), np.asarray(fraud))
        self.stats.events += len(recs)
        metrics.EVENTS.labels(self._label_spec.name).inc(len(recs))

    def _advance_label_positions(self) -> None:
        """A labels partition's position = its oldest label not applied yet (or past the last one read)."""
        pos = self.checkpointer.positions
        for (topic, p), read_next in self._label_read.items():
            spec = self.scorers[self.label_topics[topic]].spec
            assert isinstance(spec, TransactionStream)
            ctx = spec.contexts.get(p)
            first = ctx.first_pending_offset if ctx is not None else None
            pos.advance((topic, p), read_next if first is None else first)

    def _drop_reapplied(self, recs: list[RawRecord]) -> list[RawRecord]:
        """Never apply a record to state twice: a broker that lost its log (e.g. restarted with memory
        storage) makes the consumer reset to an earlier offset; those records are skipped, loudly (the
        offset-reset policy is applied before, by _check_log_ends, when the log's end shows a reset)."""
        nxt = self._next_offset
        keep = None
        for i, r in enumerate(recs):
            tp = (r.topic, r.partition)
            expected = nxt.get(tp, 0)
            if r.offset < expected:
                if keep is None:
                    keep = recs[:i]
                continue
            nxt[tp] = r.offset + 1
            if keep is not None:
                keep.append(r)
        if keep is None:
            return recs
        log.warning(
            "skipped %d records below the already-processed position (broker log reset or truncated?)",
            len(recs) - len(keep),
        )
        return keep

    # -- loop ---------------------------------------------------------------------------------------
    def checkpoint_with_retry(self, snapshot: bool | set[TopicPartition], stop: threading.Event | None = None) -> bool:
        """Retries with backoff while the database is down; the processor reports not ready meanwhile."""
        delay, was_ready = 0.2, self.ready.is_set()
        while True:
            try:
                self.checkpointer.checkpoint(snapshot)
                self.stats.checkpoints += 1
                if was_ready:
                    self.ready.set()
                return True
            except CheckpointError as exc:
                self.ready.clear()
                self.stats.db_failures += 1
                log.warning("checkpoint failed, offsets NOT committed; retrying in %.1fs: %s", delay, exc)
                if stop is not None and stop.wait(delay):
                    return False
                if stop is None:
                    time.sleep(delay)
                delay = min(delay * 2, self.opt.db_retry_max_s)

    def _evict(self) -> None:
        for scorer in self.scorers.values():
            scorer.store.evict_idle(self._max_event_ts, self.opt.entity_ttl_s, self.opt.max_live_entities)
            metrics.LIVE_ENTITIES.labels(scorer.spec.name).set(len(scorer.store))

    def run(
        self,
        stop: threading.Event,
        *,
        idle_exit_s: float | None = None,
        max_events: int | None = None,
    ) -> ProcessorStats:
        if self.opt.freeze_gc:
            freeze_gc()
        self._stop = stop
        self.source.subscribe([*self.scorers, *self.label_topics], self.on_assigned, self.on_revoked)
        try:
            self._loop(stop, idle_exit_s=idle_exit_s, max_events=max_events)
        except ProcessorStopped as exc:  # mid-batch: nothing of it is committed, a restart replays it
            log.warning("%s; exiting without a final checkpoint", exc)
            return self.stats
        self.final_checkpoint()
        return self.stats

    def _loop(self, stop: threading.Event, *, idle_exit_s: float | None, max_events: int | None) -> None:
        last_commit = last_housekeeping = time.monotonic()
        last_data = time.monotonic()
        commit_every = self.opt.commit_interval_ms / 1000.0
        while not stop.is_set():
            records = self.source.poll(self.opt.poll_timeout_ms, self.opt.max_batch_records)
            if self._assign_error is not None:
                raise self._assign_error
            records = self._check_log_ends(records)
            now = time.monotonic()
            if records:
                self.handle(records)
                last_data = now
            elif self._held:
                self._release_aligned()  # labels may have caught up without new payments
            if now - last_commit >= commit_every:
                snap = self._due_snapshot(now)
                if not self.checkpoint_with_retry(snap, stop):
                    break
                last_commit = time.monotonic()
                for tp in snap:
                    if tp in self._snapshot_due:  # not the labels partitions that came along
                        self._snapshot_due[tp] = last_commit + self.opt.snapshot_interval_s
                if last_commit - last_housekeeping >= self.opt.snapshot_interval_s:  # eviction, lag gauge
                    last_housekeeping = last_commit
                    self._evict()
                    lag = self.source.lag()
                    if lag is not None:
                        metrics.LAG.set(lag)
            if max_events is not None and self.stats.events >= max_events:
                break
            if not self.ready.is_set():
                last_data = now  # idle time counts from the first assignment
            elif (
                idle_exit_s is not None
                and not records
                and now - last_data >= idle_exit_s
                and self.source.lag() == 0
                and not self.holding
            ):
                break

    def _due_snapshot(self, now: float) -> set[TopicPartition]:
        """At most one partition per checkpoint: the most overdue one that has consumed records."""
        pos = self.checkpointer.positions
        consumed = pos.consumed
        due = [
            (t, tp)
            for tp, t in self._snapshot_due.items()
            if t <= now and tp in consumed and not any(pos.replaying(u) for u in self._snapshot_unit(tp))
        ]
        if not due:
            return set()
        tp = min(due)[1]
        # the labels partition's position is only valid together with the context snapshot that holds them
        return {tp, *((labels, tp[1]) for labels, fed in self.label_topics.items() if fed == tp[0])}

    def final_checkpoint(self, attempts: int = 5) -> bool:
        """Graceful shutdown: make everything durable and commit, with a bounded number of tries."""
        for attempt in range(attempts):
            try:
                self.checkpointer.checkpoint(snapshot=True)
                return True
            except CheckpointError as exc:
                log.warning("final checkpoint failed (%d/%d): %s", attempt + 1, attempts, exc)
                time.sleep(min(2.0**attempt * 0.2, 5.0))
        log.error("shutting down without a final checkpoint; uncommitted records will be replayed on restart")
        return False
