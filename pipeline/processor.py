"""The stream processor: Source -> decode/validate -> (labels alignment) -> featurize with the partition's
state -> score -> threshold -> alerts -> incident lifecycle -> checkpoint -> commit (-> a promoted model version
takes over its stream: pipeline.processing.swap). Knows Kafka only through
pipeline.records.Source and the database only through the pipeline.checkpointing protocols.

`Processor` runs the loop and the rebalance callbacks; each stage is its own unit in pipeline.processing
(decode, dedupe, labels, scoring, alerts, recovery, snapshots, dead_letters, retry). Per-partition state is
one PartitionState (pipeline.state.partition): assignment builds it, revoking deletes it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

from pipeline import metrics
from pipeline.alerts.lifecycle import SEVERITY_BANDS, IncidentTracker
from pipeline.checkpointing import Checkpointer, ProcessorStore, Relay
from pipeline.config import Settings
from pipeline.errors import CheckpointError
from pipeline.features.streams import DecodedRecord, TransactionRecord, TransactionStream
from pipeline.processing.dead_letters import DeadLetters
from pipeline.processing.decode import decode, future_detail, future_horizon
from pipeline.processing.dedupe import Dedupe
from pipeline.processing.drift import DriftMonitor
from pipeline.processing.labels import LabelAlignment
from pipeline.processing.recovery import Recovery, drop_reapplied
from pipeline.processing.restore import PartitionRestore
from pipeline.processing.retry import DbRetry, ProcessorStopped
from pipeline.processing.samples import ScoreSampler
from pipeline.processing.scoring import ScoreStage
from pipeline.processing.shadow import ShadowScoring
from pipeline.processing.snapshots import Snapshots
from pipeline.processing.stats import ProcessorStats
from pipeline.processing.swap import ModelWatcher
from pipeline.records import DeadLetterSink, RawRecord, Source, TopicPartition
from pipeline.scoring.scorer import StreamScorer
from pipeline.state.partition import Partitions

__all__ = ["Processor", "ProcessorOptions", "ProcessorStats", "ProcessorStopped"]

log = logging.getLogger(__name__)
_gc_frozen = False


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


def _setting(name: str) -> Any:
    """The Settings default of `name`: ProcessorOptions defaults are Settings' (written once, there)."""
    return Settings.model_fields[name].default


@dataclass
class ProcessorOptions:
    """The processor's knobs: the Settings fields of the same name (from_settings), plus a few for tests/bench."""

    run_id: str = _setting("run_id")
    group_id: str = _setting("group_id")
    max_batch_records: int = _setting("max_batch_records")
    poll_timeout_ms: int = _setting("poll_timeout_ms")
    commit_interval_ms: int = _setting("commit_interval_ms")
    snapshot_interval_s: float = _setting("snapshot_interval_s")
    entity_ttl_s: float = _setting("entity_ttl_s")
    max_live_entities: int = _setting("max_live_entities")
    db_retry_max_s: float = _setting("db_retry_max_s")
    offset_reset: str = _setting("offset_reset")  # stored position outside the log: earliest | latest | fail
    dedupe_window: int = _setting("dedupe_window")  # transaction ids remembered per partition (0 = off)
    score_sample_rate: float = _setting("score_sample_rate")  # share of scored events in model_score_samples
    max_future_s: float = _setting("max_future_s")  # event times further ahead of the wall clock: dead letters
    top_features: int = 3
    shadow_max_in_flight: int = 8  # batches a challenger may fall behind before the champion waits for it
    freeze_gc: bool = True  # see freeze_gc()
    severity_bands: tuple[float, float, float] = SEVERITY_BANDS  # as the incident lifecycle's (LifecyclePolicy)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ProcessorOptions:
        own = {f.name: getattr(settings, f.name) for f in fields(cls) if f.name in Settings.model_fields}
        return cls(**{**own, **overrides})


class Processor:
    def __init__(
        self,
        source: Source,
        db: ProcessorStore,
        dlq: DeadLetterSink,
        scorers: Mapping[str, StreamScorer],  # topic -> scorer
        options: ProcessorOptions = ProcessorOptions(),
        label_topics: Mapping[str, str] | None = None,  # labels topic -> the transactions topic it feeds
        *,
        tracker: IncidentTracker | None = None,
        relay: Relay | None = None,
        db_retry: DbRetry | None = None,
        challengers: Mapping[str, StreamScorer] | None = None,  # topic -> its stream's challenger (shadow)
        models: ModelWatcher | None = None,  # switches streams to promoted versions (pipeline.processing.swap)
    ) -> None:
        """tracker: the incident lifecycle (its outputs go into each checkpoint), relay: publishes them to the
        alerts topic; db_retry: the database-retry policy (shared with whoever else reads the database while
        processing, e.g. the tracker's loads); challengers: score in shadow (pipeline.processing.shadow)."""
        self.source, self.dlq, self.opt, self.models = source, dlq, options, models
        self.scorers = dict(scorers)
        self.db_retry = db_retry or DbRetry(options.db_retry_max_s)
        self.ready = self.db_retry.ready  # partitions assigned and the database reachable (/readyz)
        self.stats = ProcessorStats(self.db_retry)
        self.partitions = Partitions()
        self.restore = PartitionRestore(
            db, self.db_retry, run_id=options.run_id, group_id=options.group_id, dedupe_window=options.dedupe_window
        )
        self.dead = DeadLetters(dlq, self.partitions, self.stats)
        self.dedupe = Dedupe(options.dedupe_window, self.partitions, self.restore, self.stats)
        specs = {t: s.spec for t, s in self.scorers.items() if isinstance(s.spec, TransactionStream)}
        self.labels = LabelAlignment(
            label_topics or {},
            specs,
            source=source,
            partitions=self.partitions,
            restore=self.restore,
            dead=self.dead,
            dedupe=self.dedupe if options.dedupe_window > 0 else None,
            stats=self.stats,
            hold_cap=2 * options.max_batch_records,
            max_future_s=options.max_future_s,
        )
        self.recovery = Recovery(source, self.partitions, self.restore, options.offset_reset)
        self.snapshots = Snapshots(self.scorers, self.partitions, self.labels.snapshot_unit)
        sampler = ScoreSampler(options.score_sample_rate)
        self.shadow = ShadowScoring(  # challengers may also start (and stop) later: pipeline.processing.swap
            challengers or {},
            run_id=options.run_id,
            partitions=self.partitions,
            sampler=sampler,
            top_features=options.top_features,
            severity_bands=options.severity_bands,
            max_in_flight=options.shadow_max_in_flight,
        )
        self.checkpointer = Checkpointer(
            db,
            source,
            dlq,
            self.partitions,
            run_id=options.run_id,
            group_id=options.group_id,
            collect_states=self.snapshots.collect,
            snapshot_unit=self.labels.snapshot_unit,
            tracker=tracker,
            relay=relay,
            collect_models=self.shadow.collect,
        )
        self.drift = DriftMonitor()  # the drift gauges; the API's /api/drift when it runs in this process
        self.scoring = ScoreStage(
            run_id=options.run_id,
            partitions=self.partitions,
            restore=self.restore,
            dead=self.dead,
            checkpointer=self.checkpointer,
            stats=self.stats,
            top_features=options.top_features,
            severity_bands=options.severity_bands,
            sampler=sampler,
            drift=self.drift,
            shadow=self.shadow,
        )
        self._assign_error: Exception | None = None

    @property
    def label_topics(self) -> dict[str, str]:
        return self.labels.label_topics

    @property
    def holding(self) -> int:
        """Payments read but waiting for their labels partition to catch up."""
        return self.labels.holding

    # -- rebalance callbacks -------------------------------------------------------------------------
    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        try:
            self.recovery.assign(tps)
            # a labels partition is never snapshotted on its own, only with its transactions partition
            self.labels.check_copartitioned(tps)
            own = [tp for tp in tps if tp[0] not in self.label_topics]
            self.snapshots.stagger(own, time.monotonic(), self.opt.snapshot_interval_s)
            self.ready.set()
        except Exception as exc:
            self._assign_error = exc  # the Kafka client swallows listener errors: run() raises it after poll
            raise

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        if not tps:
            return
        self.shadow.settle()  # the challengers' rows of the revoked partitions go with this checkpoint
        try:
            self.checkpointer.checkpoint(snapshot=True)
        except CheckpointError as exc:
            # not committed: the next owner replays the revoked partitions from their last durable checkpoint.
            # Outputs of partitions we keep stay pending for our next checkpoint.
            log.warning("checkpoint on revoke failed (%s); partitions will be replayed by their next owner", exc)
        self.checkpointer.forget(tps)
        for tp in tps:
            scorer = self.scorers.get(tp[0])
            if scorer is not None:
                scorer.store.drop_partition(tp[1])
            self.shadow.drop_partition(*tp)
            self.recovery.forget(tp)
            self.partitions.revoke(tp)  # its context, labels, held payments, dedupe window, positions
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in tps))

    # -- records ------------------------------------------------------------------------------------
    def handle(self, records: Sequence[RawRecord]) -> None:
        """One poll's records, through the data path."""
        by_topic: dict[str, list[RawRecord]] = defaultdict(list)
        for r in records:
            by_topic[r.topic].append(r)
        for topic in self.label_topics:  # queue labels first: payments of this poll may already need them
            if topic in by_topic:
                self.labels.read(topic, drop_reapplied(self.partitions, by_topic.pop(topic), self.source))
        for topic, recs in by_topic.items():
            scorer = self.scorers.get(topic)
            if scorer is None:
                continue
            spec = scorer.spec
            recs = drop_reapplied(self.partitions, recs, self.source)
            aligned = topic in self.labels.fed_by
            # payments held for their labels are deduplicated when released (LabelAlignment.hold): the dedupe
            # window holds no key above the partition's position, so a replay from a snapshot never drops them
            dedupe = self.opt.dedupe_window > 0 and not aligned
            good: list[DecodedRecord] = []
            good_recs: list[RawRecord] = []
            horizon = future_horizon(self.opt.max_future_s)
            for r in recs:
                rec = decode(spec, r, self.dead)
                if rec is None:
                    continue
                if rec.timestamp > horizon:  # before dedupe and state: a wrong clock must not move either
                    self.dead.send(r, "from_the_future", future_detail(rec.timestamp, self.opt.max_future_s))
                    continue
                if dedupe and self.dedupe.duplicate(spec, r, rec):
                    continue
                good.append(rec)
                good_recs.append(r)
            self.stats.events += len(recs)
            metrics.EVENTS.labels(spec.name).inc(len(recs))
            if aligned:  # payments wait until their partition's labels have caught up with them
                ready_recs, ready = self.labels.hold(topic, recs, good_recs, cast(list[TransactionRecord], good))
                self.scoring.score(topic, scorer, ready_recs, ready)
                continue
            last: dict[int, int] = {}  # partition -> its last offset in this poll (one state update each)
            for r in recs:
                last[r.partition] = r.offset
            for p, offset in last.items():
                self.partitions[(topic, p)].advance(offset + 1)
            self.scoring.score(topic, scorer, good_recs, good)
        self.release_waiting()
        self.labels.advance_label_positions()

    def release_waiting(self) -> None:
        """Score held payments whose labels have caught up."""
        for topic in self.labels.waiting():
            good_recs, good = self.labels.release(topic)
            self.scoring.score(topic, self.scorers[topic], good_recs, good)

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
                self.db_retry.failed()
                log.warning(  # the first line: the driver's message (the statement follows it)
                    "checkpoint failed, offsets NOT committed; retrying in %.1fs: %s", delay, str(exc).splitlines()[0]
                )
                if stop is not None and stop.wait(delay):
                    return False
                if stop is None:
                    time.sleep(delay)
                delay = min(delay * 2, self.opt.db_retry_max_s)

    def swap_models(self, now: float) -> None:
        """At a checkpoint boundary: streams whose promoted version can serve them switch to it."""
        if self.models is None:
            return
        swaps = self.models.poll(self.scorers, now, self.shadow.challengers)
        for topic, scorer in swaps.champions.items():
            self.scorers[topic] = scorer
            self.snapshots.force(topic)
        for topic, challenger in swaps.challengers.items():
            self.shadow.replace(topic, challenger)

    def _evict(self) -> None:
        for scorer in self.scorers.values():
            scorer.store.evict_idle(self.scoring.latest_event_ts, self.opt.entity_ttl_s, self.opt.max_live_entities)
        self.shadow.evict(self.scoring.latest_event_ts, self.opt.entity_ttl_s, self.opt.max_live_entities)

    def run(
        self,
        stop: threading.Event,
        *,
        idle_exit_s: float | None = None,
        max_events: int | None = None,
    ) -> ProcessorStats:
        if self.opt.freeze_gc:
            freeze_gc()
        self.db_retry.until(stop)
        self.source.subscribe([*self.scorers, *self.label_topics], self.on_assigned, self.on_revoked)
        try:
            self._loop(stop, idle_exit_s=idle_exit_s, max_events=max_events)
        except ProcessorStopped as exc:  # mid-batch: nothing of it is committed, a restart replays it
            log.error(
                "%s: shutting down without a final checkpoint; uncommitted records will be replayed on restart", exc
            )
            self.stats.final_checkpoint = False
            return self.stats
        finally:
            self.shadow.close()
        self.stats.final_checkpoint = self.final_checkpoint()
        return self.stats

    def _loop(self, stop: threading.Event, *, idle_exit_s: float | None, max_events: int | None) -> None:
        last_commit = last_housekeeping = time.monotonic()
        last_data = time.monotonic()
        commit_every = self.opt.commit_interval_ms / 1000.0
        while not stop.is_set():
            records = self.source.poll(self.opt.poll_timeout_ms, self.opt.max_batch_records)
            if self._assign_error is not None:
                raise self._assign_error
            records = self.recovery.check_log_ends(records)
            now = time.monotonic()
            if records:
                self.handle(records)
                last_data = now
            elif self.holding:
                self.release_waiting()  # labels may have caught up without new payments
            if now - last_commit >= commit_every:
                snap = self.snapshots.due(now)
                if not self.checkpoint_with_retry(snap, stop):
                    break
                last_commit = time.monotonic()
                # a checkpoint boundary: every output of the scorers so far is durable (where a stream's scorer
                # can be swapped for another model without mixing two models' outputs in one checkpoint)
                self.snapshots.taken(snap, last_commit, self.opt.snapshot_interval_s)
                self.swap_models(last_commit)
                for scorer in self.scorers.values():  # as it is between evictions too, not just after one
                    metrics.LIVE_ENTITIES.labels(scorer.spec.name).set(len(scorer.store))
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
                if not self.partitions.states:  # "0 events" alone would read as "nothing to do"
                    log.warning(
                        "idle exit without a partition: another member of consumer group %r holds them all "
                        "(PIPELINE_GROUP_ID), or the topics have none",
                        self.opt.group_id,
                    )
                break

    def final_checkpoint(self, attempts: int = 5) -> bool:
        """Graceful shutdown: make everything durable and commit, with a bounded number of tries."""
        for attempt in range(attempts):
            try:
                self.checkpointer.checkpoint(snapshot=True)
                return True
            except CheckpointError as exc:
                log.warning("final checkpoint failed (%d/%d): %s", attempt + 1, attempts, str(exc).splitlines()[0])
                time.sleep(min(2.0**attempt * 0.2, 5.0))
        log.error("shutting down without a final checkpoint; uncommitted records will be replayed on restart")
        return False
