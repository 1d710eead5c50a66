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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline import metrics
from pipeline.checkpointing import Checkpointer
from pipeline.errors import CheckpointError, DecodeError, SinkError, StateError
from pipeline.features.streams import LabelStream, StreamSpec, TransactionStream
from pipeline.records import DeadLetterSink, RawRecord, Source, TopicPartition
from pipeline.scoring.scorer import StreamScorer
from pipeline.sinks.sql import AlertRow, SqlStore, StateRow

log = logging.getLogger(__name__)
_gc_frozen = False


def context_key(partition: int) -> str:
    """entity_state key of a partition's terminal context ('#' is never the first character of an entity id)."""
    return f"#terminals:{partition}"


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


@dataclass
class ProcessorStats:
    events: int = 0
    scored: int = 0
    dead_letters: int = 0
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
        self.checkpointer = Checkpointer(db, source, dlq, run_id=options.run_id, group_id=options.group_id,
                                         collect_states=self._collect_states, after_durable=after_durable)
        for topic, scorer in scorers.items():
            scorer.store.loader = self._loader_for(scorer.spec.name)
            if isinstance(scorer.spec, TransactionStream) and scorer.spec.terminal_context:
                scorer.spec.context_loader = self._context_loader_for(topic, scorer.spec.name)
        for labels, fed in self.label_topics.items():
            spec = scorers[fed].spec if fed in scorers else None
            if not (isinstance(spec, TransactionStream) and spec.label_feedback):
                raise ValueError(f"labels topic {labels!r} feeds {fed!r}, which is not a transactions stream "
                                 "whose model reads label feedback")
        self._max_event_ts = 0.0
        self.ready = threading.Event()
        self._next_offset: dict[TopicPartition, int] = {}  # records below this were applied already
        self._snapshot_due: dict[TopicPartition, float] = {}  # monotonic time each partition's snapshot is due

    # -- partitions ---------------------------------------------------------------------------------
    def _loader_for(self, stream: str) -> Callable[[Sequence[str]], dict[str, bytes]]:
        return lambda ids: self.db.load_states(self.opt.run_id, stream, ids)

    def _context_loader_for(self, topic: str, stream: str) -> Callable[[int], bytes | None]:
        def load(partition: int) -> bytes | None:
            key = context_key(partition)
            blob = self.db.load_states(self.opt.run_id, stream, [key]).get(key)
            if blob is None and self.checkpointer.positions.snapshot.get((topic, partition)) is not None:
                raise StateError(f"{topic}[{partition}] has a state snapshot but no terminal context (written by a "
                                 "model without terminal features?); use a new run id for this model")
            return blob

        return load

    def _load_offsets(self) -> dict[TopicPartition, tuple[int, int | None]]:
        """Positions must come from the database: without them state would restart from the wrong place,
        so a database outage during assignment is waited out (the heartbeat thread keeps us in the group)."""
        delay = 0.2
        while True:
            try:
                return self.db.load_offsets(self.opt.run_id, self.opt.group_id)
            except SinkError as exc:
                self.stats.db_failures += 1
                log.warning("cannot read partition checkpoints; retrying in %.1fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, self.opt.db_retry_max_s)

    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        self._assigned = set(tps)
        saved = self._load_offsets()
        pos = self.checkpointer.positions
        for tp in tps:
            committed, snap = saved.get(tp, (None, None))
            if committed is None:
                committed = self.source.committed(tp)
            # no snapshot yet: rebuild state from the start, even if outputs were committed
            start = snap if snap is not None else 0
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

    def _check_copartitioned(self, tps: Sequence[TopicPartition]) -> None:
        """Labels reach a payment's context only if this worker owns both partition p's: the range assignor
        (kafka-python's default) guarantees it when both topics have the same number of partitions."""
        have = set(tps)
        for labels, fed in self.label_topics.items():
            lone = sorted({p for t, p in have if t == labels} ^ {p for t, p in have if t == fed})
            if lone:
                log.error("partitions %s of %s / %s are not assigned together: labels of those partitions cannot "
                          "reach their payments (are the topics' partition counts equal, is the range assignor "
                          "in use?)", lone, fed, labels)

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
            self.checkpointer.pending = [a for a in self.checkpointer.pending
                                         if (a.source_topic, a.source_partition) not in revoked]
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
                rows.extend(StateRow(spec.name, context_key(p), t, p, spec.contexts[p].snapshot())
                            for t, p in tps if t == topic and p in spec.contexts)

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
            for r in recs:
                rec = self._decode(spec, r)
                if rec is not None:
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
        """The validated record, or None after dead-lettering it (not again below the durable position)."""
        try:
            rec = spec.decode(r.value)
            if r.key is not None and r.key.decode("utf-8", "replace") != spec.entity_of(rec):
                raise DecodeError("key_mismatch", f"key {r.key[:80]!r} != {spec.entity_field}")
            return rec
        except DecodeError as exc:
            if r.offset >= self.recovery_until.get((r.topic, r.partition), 0):
                self.dlq.send(r, exc.reason, exc.detail)
                self.stats.dead_letters += 1
                metrics.DLQ.labels(exc.reason).inc()
            return None

    def _score(self, topic: str, scorer: StreamScorer, good_recs: list[RawRecord], good: list[Any]) -> None:
        spec = scorer.spec
        if not good:
            return
        parts = np.fromiter((r.partition for r in good_recs), np.int32, len(good_recs))
        cols = spec.columns(good, parts)
        res = scorer.process(cols, parts)
        self.stats.scored += len(good)
        metrics.SCORED.labels(spec.name).inc(len(good))
        metrics.BATCH_FILL.observe(len(good))
        self._max_event_ts = max(self._max_event_ts, float(cols.ts.max()))
        self.checkpointer.observe(topic, spec.name, good_recs, parts, cols.ts, res)  # incident lifecycle
        for i in np.flatnonzero(res.is_anomaly):
            r = good_recs[i]
            top = np.argsort(-res.contributions[i])[: self.opt.top_features]
            self.checkpointer.pending.append(AlertRow(
                alert_key=f"{self.opt.run_id}|{r.topic}|{r.partition}|{r.offset}|{scorer.model_version}",
                run_id=self.opt.run_id,
                stream=spec.name,
                entity_id=res.entity_ids[i],
                event_time=datetime.fromtimestamp(float(cols.ts[i]), tz=timezone.utc),
                score=float(res.scores[i]),
                threshold=float(res.thresholds[i]),
                severity=severity(float(res.scores[i]), float(res.thresholds[i])),
                model_version=scorer.model_version,
                top_features=[{"feature": spec.feature_names[j], "observed": float(res.observed[i, j]),
                               "reconstructed": float(res.reconstructed[i, j]),
                               "contribution": float(res.contributions[i, j])} for j in top],
                source_topic=r.topic, source_partition=r.partition, source_offset=r.offset,
            ))
            self.stats.alerts += 1
            self.stats.alerts_by_stream[spec.name] += 1

    # -- label feedback: event-time alignment ---------------------------------------------------------
    def _align(self, topic: str, recs: list[RawRecord], good_recs: list[RawRecord], good: list[Any]
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
        queued: dict[int, tuple[list[int], list[str], list[float], list[float]]] = defaultdict(
            lambda: ([], [], [], []))
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
        storage) makes the consumer reset to an earlier offset; those records are skipped, loudly."""
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
        log.warning("skipped %d records below the already-processed position (broker log reset or truncated?)",
                    len(recs) - len(keep))
        return keep

    # -- loop ---------------------------------------------------------------------------------------
    def checkpoint_with_retry(self, snapshot: bool | set[TopicPartition], stop: threading.Event | None = None) -> bool:
        delay = 0.2
        while True:
            try:
                self.checkpointer.checkpoint(snapshot)
                self.stats.checkpoints += 1
                return True
            except CheckpointError as exc:
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
        self.source.subscribe([*self.scorers, *self.label_topics], self.on_assigned, self.on_revoked)
        last_commit = last_housekeeping = time.monotonic()
        last_data = time.monotonic()
        commit_every = self.opt.commit_interval_ms / 1000.0
        while not stop.is_set():
            records = self.source.poll(self.opt.poll_timeout_ms, self.opt.max_batch_records)
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
            elif idle_exit_s is not None and not records and now - last_data >= idle_exit_s \
                    and self.source.lag() == 0 and not self.holding:
                break
        self.final_checkpoint()
        return self.stats

    def _due_snapshot(self, now: float) -> set[TopicPartition]:
        """At most one partition per checkpoint: the most overdue one that has consumed records."""
        consumed = self.checkpointer.positions.consumed
        due = [(t, tp) for tp, t in self._snapshot_due.items() if t <= now and tp in consumed]
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
