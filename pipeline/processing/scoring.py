"""The scoring stage of one stream's batch: featurize with the partitions' state -> model -> threshold
(StreamScorer.process) -> build alerts -> incident lifecycle, with every failure isolated to its record.

If featurizing or scoring raises, the batch's state changes are undone and its halves are retried, down to
single records: a record that makes a stage raise is dead-lettered alone (processing_error, naming the stage)
and every other record is scored exactly once. The happy path pays only the undo savepoint."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from pipeline import metrics
from pipeline.checkpointing import Checkpointer
from pipeline.checkpointing.rows import AlertRow
from pipeline.errors import PipelineError
from pipeline.features.streams import DecodedRecord, StreamSpec, TransactionStream
from pipeline.features.terminal import TerminalContext
from pipeline.processing import alerts
from pipeline.processing.dead_letters import DeadLetters, out_of_order_detail
from pipeline.processing.drift import DriftMonitor
from pipeline.processing.restore import PartitionRestore
from pipeline.processing.samples import ScoreSampler, warm_events
from pipeline.processing.shadow import ShadowScoring
from pipeline.processing.stats import ProcessorStats
from pipeline.records import RawRecord
from pipeline.scoring.scorer import ScoreBatch, StreamScorer
from pipeline.state.partition import Partitions


def _nothing() -> None:
    pass


class _StageFailed(Exception):
    """A stage raised for a (sub-)batch whose state changes were undone: the caller splits and retries."""

    def __init__(self, stage: str, exc: Exception) -> None:
        super().__init__(stage)
        self.stage, self.exc = stage, exc


class ScoreStage:
    def __init__(
        self,
        *,
        run_id: str,
        partitions: Partitions,
        restore: PartitionRestore,
        dead: DeadLetters,
        checkpointer: Checkpointer,
        stats: ProcessorStats,
        top_features: int,
        severity_bands: Sequence[float],
        sampler: ScoreSampler,
        drift: DriftMonitor,
        shadow: ShadowScoring | None = None,
    ) -> None:
        """sampler, drift: every champion's scored events feed its score samples and drift gauges; shadow: the
        challengers, which score what the champions scored."""
        self.run_id, self.partitions, self.restore, self.dead = run_id, partitions, restore, dead
        self.sampler, self.drift, self.shadow = sampler, drift, shadow
        self.checkpointer, self.stats = checkpointer, stats
        self.top_features, self.severity_bands = top_features, tuple(severity_bands)
        self.latest_event_ts = 0.0  # event-time clock of idle-entity eviction

    def score(
        self, topic: str, scorer: StreamScorer, good_recs: Sequence[RawRecord], good: Sequence[DecodedRecord]
    ) -> None:
        if not good:
            return
        try:
            self._score_batch(topic, scorer, good_recs, good)
        except _StageFailed as failed:
            if len(good) == 1:
                self.dead.processing_error(good_recs[0], failed.stage, failed.exc)
                self._not_scored(scorer.spec, good_recs[0], good[0])
                return
            mid = len(good) // 2
            self.score(topic, scorer, good_recs[:mid], good[:mid])
            self.score(topic, scorer, good_recs[mid:], good[mid:])

    def _not_scored(self, spec: StreamSpec, r: RawRecord, rec: DecodedRecord) -> None:
        """A record dead-lettered after the dedupe stage remembered its key: forget the key, so that its
        corrected resend is scored rather than dropped as a duplicate of a record that was never scored."""
        window = self.partitions[(r.topic, r.partition)].dedupe
        key = spec.dedupe_key(rec)
        if window is not None and key is not None:
            window.forget(key)

    def _contexts(self, topic: str, spec: StreamSpec, parts: np.ndarray) -> dict[int, TerminalContext] | None:
        """The terminal contexts the batch's featurization reads and updates (transactions with terminal
        features), restored on first use."""
        if not (isinstance(spec, TransactionStream) and spec.terminal_context):
            return None
        return {p: self.restore.context(self.partitions[(topic, p)], spec) for p in np.unique(parts).tolist()}

    def _resume_entities(self, scorer: StreamScorer, entity_ids: Sequence[str]) -> None:
        """Entities first seen since assignment (or eviction) resume from their last saved state, read here
        (through the database-retry policy) before the scorer touches them."""
        missing = scorer.store.unknown(entity_ids)
        if missing:
            scorer.store.admit(self.restore.entity_states(scorer.spec.name, missing))

    def _score_batch(
        self, topic: str, scorer: StreamScorer, good_recs: Sequence[RawRecord], good: Sequence[DecodedRecord]
    ) -> None:
        spec = scorer.spec
        parts = np.fromiter((r.partition for r in good_recs), np.int32, len(good_recs))
        undo_state: Callable[[], None] = _nothing
        undo_contexts: Callable[[], None] = _nothing
        out_of_order: list[tuple[RawRecord, DecodedRecord, float]] = []
        stage = "featurize"
        try:
            contexts = self._contexts(topic, spec, parts)
            undo_contexts = _savepoint(contexts)
            cols = spec.columns(good, parts, contexts)
            stage = "score"
            self._resume_entities(scorer, cols.entity_ids)
            undo_state = scorer.savepoint(cols.entity_ids, parts)
            res = scorer.process(cols, parts)
            if res.late is not None and res.rejected is not None and contexts is not None:
                # featurizing folded late and out-of-order payments into their terminal context, which must stay
                # as if they had not come (as their customers' states do): undo the batch and re-run it without
                # the rejected ones, the late ones featurized from the context without being folded in. Rare:
                # only batches holding such payments pay a second pass.
                undo_state()
                undo_contexts()
                out_of_order = [
                    (good_recs[i], good[i], float(cols.ts[i])) for i in np.flatnonzero(res.rejected).tolist()
                ]
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
                    cols = spec.columns(good, parts, contexts, frozen)
                    stage = "score"
                    undo_state = scorer.savepoint(cols.entity_ids, parts)
                    res = scorer.process(cols, parts)
        except PipelineError:
            undo_state()
            raise  # raised on purpose for the operator (state, database, stop): not one record's fault
        except Exception as exc:  # noqa: BLE001 - isolated by score()
            undo_state()
            undo_contexts()
            raise _StageFailed(stage, exc) from exc
        # the batch is applied to state now: later stages isolate failures per record and never re-score
        if self.shadow is not None:
            self.shadow.score(topic, good_recs, cols, parts)
        for r, rec, t in out_of_order:
            self.dead.send(r, "out_of_order", out_of_order_detail(t, scorer.allowed_lateness_s))
            self._not_scored(scorer.spec, r, rec)
        if not good_recs:
            return
        ts = cols.ts
        if res.rejected is not None and res.rejected.any():  # behind their entity by more than allowed
            for i in np.flatnonzero(res.rejected).tolist():
                self.dead.send(
                    good_recs[i], "out_of_order", out_of_order_detail(float(ts[i]), scorer.allowed_lateness_s)
                )
                self._not_scored(scorer.spec, good_recs[i], good[i])
            keep = np.flatnonzero(~res.rejected)
            good_recs, parts, ts, res = [good_recs[i] for i in keep.tolist()], parts[keep], ts[keep], res.take(keep)
            if not good_recs:
                return
        if res.late is not None:
            metrics.LATE_EVENTS.labels(spec.name).inc(int(res.late.sum()))
        first = self._scored_first_time(topic, good_recs, parts)
        self.stats.scored += first
        self.stats.rebuilt += len(good_recs) - first
        metrics.SCORED.labels(spec.name).inc(len(good_recs))
        metrics.BATCH_FILL.observe(len(good_recs))
        self.latest_event_ts = max(self.latest_event_ts, float(ts.max()))
        self._lifecycle(topic, spec.name, good_recs, parts, ts, res)
        built = self._alerts(scorer, good_recs, ts, res)
        self.checkpointer.add(built)
        warm = warm_events(scorer, res)
        self.checkpointer.add_samples(self.sampler.rows(scorer, good_recs, ts, res, warm))
        self.drift.observe(scorer, res, warm)
        # counted once: a replayed record's alert is durable already (the checkpoint does not write it again)
        floor = self.partitions.replay_floor
        fresh = sum(1 for a in built if a.source_offset >= floor((a.source_topic, a.source_partition)))
        self.stats.alerts += fresh
        self.stats.alerts_by_stream[spec.name] += fresh

    def _scored_first_time(self, topic: str, recs: Sequence[RawRecord], parts: np.ndarray) -> int:
        """How many of the batch's records are not replays of records whose outputs are durable already."""
        floors = np.zeros(int(parts.max()) + 1, np.int64)
        for p in np.unique(parts).tolist():
            floors[p] = self.partitions.replay_floor((topic, p))
        if not floors.any():
            return len(recs)
        offsets = np.fromiter((r.offset for r in recs), np.int64, len(recs))
        return int((offsets >= floors[parts]).sum())

    def _lifecycle(
        self, topic: str, stream: str, recs: Sequence[RawRecord], parts: np.ndarray, ts: np.ndarray, res: ScoreBatch
    ) -> None:
        """Incident lifecycle; a record whose update raises is dead-lettered as incident_error (its alert stands)."""
        try:
            failed = self.checkpointer.observe(topic, stream, recs, parts, ts, res)
        except PipelineError:
            raise
        except Exception as batch_exc:  # noqa: BLE001 - outside the per-event loop: the whole batch's lifecycle
            failed = [(i, batch_exc) for i in range(len(recs))]
        for i, err in failed:
            self.dead.incident_error(recs[i], err)

    def _alerts(
        self, scorer: StreamScorer, recs: Sequence[RawRecord], ts: np.ndarray, res: ScoreBatch
    ) -> list[AlertRow]:
        """Alert rows, keyed with the log epoch as the alert is built (as its incident's key is)."""
        tag = self.partitions.tag
        build = alerts.build_alerts
        try:
            return build(self.run_id, scorer, recs, ts, res, self.top_features, tag, self.severity_bands)
        except Exception:  # noqa: BLE001 - a pure function: rebuild alert by alert to find the culprit
            out: list[AlertRow] = []
            for i in np.flatnonzero(res.is_anomaly).tolist():
                only = np.zeros(len(recs), bool)
                only[i] = True
                try:
                    out += build(
                        self.run_id,
                        scorer,
                        recs,
                        ts,
                        replace(res, is_anomaly=only),
                        self.top_features,
                        tag,
                        self.severity_bands,
                    )
                except Exception as exc:  # noqa: BLE001 - one record must never stop the service
                    self.dead.processing_error(recs[i], "alert", exc)
            return out


def _savepoint(contexts: dict[int, TerminalContext] | None) -> Callable[[], None]:
    """Undo for the terminal contexts a batch's featurization updates."""
    if not contexts:
        return _nothing
    undo = [ctx.savepoint() for ctx in contexts.values()]

    def restore() -> None:
        for u in undo:
            u()

    return restore
