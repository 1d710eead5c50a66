"""Shadow (challenger) scoring: a stream's challenger model scores the events its champion scored, batched,
after the champion, with the same featurized columns (so a terminal context is stepped once, by the champion).

Its would-be alerts become shadow rows (shadow_alerts, model_version = the challenger's) and its sampled
scores model_score_samples rows. Shadow rows never reach the incident lifecycle, the outbox or the alerts
topic. A failure of the challenger never touches the champion's path: the batch's challenger state is undone,
the error logged and counted (pipeline_shadow_errors_total), nothing dead-lettered.

Nor does its cost: the challenger scores on a worker thread of its own, one batch after another in the order
the champion scored them, so its model call (torch releases the GIL) runs on another core while the champion
goes on, and a checkpoint does not wait for it. Its rows go with the first checkpoint after it finished their
batch (`collect`), possibly after their events' positions were committed (the rows are idempotent). The
champion waits only when the challenger is more than `max_in_flight` batches behind (it cannot keep up with
the stream), at a revoke (`settle`: the revoked partitions' rows go with the revoke's checkpoint) and at a
graceful stop (`close`: every row is written by the final checkpoint). A kill loses the rows of the batches in
flight (at most `max_in_flight`): the restart replays their events, but rows of replayed records are dropped,
as the champion's are (durable already, or else scored by a re-warming challenger). The challenger's state is
only touched on the worker thread, or after the batches in flight finished (`replace`, `drop_partition`,
`evict` wait for them).

Challengers come in at start and, when the stream names a registry alias, follow it while running
(pipeline.processing.swap). A challenger keeps its own per-entity state, in memory only: it is never
snapshotted, so after a restart (or a rebalance, or when it starts) its entities re-warm from their next
events (min_history events before a shadow alert), and the comparison with the champion is only like for like
once they have.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline import metrics
from pipeline.checkpointing.rows import AlertRow, ModelScoreRow, ModelWrite
from pipeline.features.streams import EventColumns
from pipeline.processing import alerts
from pipeline.processing.samples import ScoreSampler, warm_events
from pipeline.records import RawRecord, TopicPartition
from pipeline.scoring.scorer import StreamScorer
from pipeline.state.partition import Partitions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Batch:
    challenger: StreamScorer
    recs: list[RawRecord]
    cols: EventColumns
    parts: np.ndarray  # (N,) partition of each record
    tags: dict[TopicPartition, str]  # log-epoch tag of each partition when the champion scored the batch
    floors: dict[int, int]  # partition -> durable position then; records below it are replays


class ShadowScoring:
    def __init__(
        self,
        challengers: Mapping[str, StreamScorer],  # topic -> the challenger of its stream
        *,
        run_id: str,
        partitions: Partitions,
        sampler: ScoreSampler,
        top_features: int,
        severity_bands: Sequence[float],
        max_in_flight: int = 8,
    ) -> None:
        """max_in_flight: batches the challenger may fall behind the champion before the champion waits."""
        self.challengers = dict(challengers)
        self.max_in_flight = max_in_flight
        self.run_id, self.partitions, self.sampler = run_id, partitions, sampler
        self.top_features, self.severity_bands = top_features, tuple(severity_bands)
        self.scored = 0  # events the challengers scored (this process), counted as their rows are collected
        self._worker: ThreadPoolExecutor | None = None
        self._in_flight: deque[Future[tuple[str, int, ModelWrite] | None]] = deque()
        self._finished = ModelWrite()  # rows of finished batches, not collected yet

    def score(self, topic: str, recs: Sequence[RawRecord], cols: EventColumns, parts: np.ndarray) -> None:
        """The events the champion of `topic` just scored (recs[i] featurized as row i of cols); neither is
        changed afterwards by the champion's path, so the worker reads them as they are. What the worker needs
        of the partitions (log-epoch tags, durable positions) is read here, on the processor's thread."""
        challenger = self.challengers.get(topic)
        if challenger is None or not recs:
            return
        tags: dict[TopicPartition, str] = {}
        floors: dict[int, int] = {}  # records below their partition's durable position are replays
        for p in np.unique(parts).tolist():
            tags[(topic, p)] = self.partitions.tag((topic, p))
            floors[p] = self.partitions.replay_floor((topic, p))
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        batch = _Batch(challenger, list(recs), cols, parts, tags, floors)
        self._in_flight.append(self._worker.submit(self._score, batch))
        while len(self._in_flight) > self.max_in_flight:  # the challenger is slower than the stream: wait
            self._take(self._in_flight.popleft())

    def _score(self, batch: _Batch) -> tuple[str, int, ModelWrite] | None:
        """On the worker thread: (stream, events scored, rows), or None when the challenger failed. Rows of
        replayed records are dropped (durable already), as the checkpointer drops the champion's."""
        challenger, recs, cols, parts = batch.challenger, batch.recs, batch.cols, batch.parts
        stream = challenger.spec.name
        undo = challenger.savepoint(cols.entity_ids, parts)
        try:
            res = challenger.process(cols, parts)
            touched, ts = res.slots, cols.ts
            if res.rejected is not None and res.rejected.any():  # behind their entity: not scored
                keep = np.flatnonzero(~res.rejected)
                recs, ts, res = [recs[i] for i in keep.tolist()], ts[keep], res.take(keep)
            built = alerts.build_alerts(
                self.run_id,
                challenger,
                recs,
                ts,
                res,
                self.top_features,
                batch.tags.__getitem__,
                self.severity_bands,
            )
            samples = self.sampler.rows(challenger, recs, ts, res, warm_events(challenger, res))
        except Exception:  # noqa: BLE001 - the challenger must never affect the champion's path
            undo()
            metrics.SHADOW_ERRORS.labels(stream).inc()
            log.exception(
                "challenger %s of %s failed on a batch of %d events", challenger.model_version, stream, len(recs)
            )
            return None
        challenger.store.mark_clean(touched)  # never snapshotted: clean, so idle entities can be evicted
        fresh = batch.floors

        def new(row: AlertRow | ModelScoreRow) -> bool:
            return row.source_offset >= fresh[row.source_partition]

        rows = ModelWrite([a for a in built if new(a)], [r for r in samples if new(r)])
        return stream, len(recs), rows

    def _take(self, batch: Future[tuple[str, int, ModelWrite] | None]) -> None:
        outcome = batch.result()
        if outcome is None:
            return
        stream, n, rows = outcome
        self._finished.extend(rows)
        self.scored += n
        metrics.SHADOW_SCORED.labels(stream).inc(n)

    def settle(self) -> None:
        """Wait for the batches in flight; their rows wait for `collect`."""
        while self._in_flight:
            self._take(self._in_flight.popleft())

    def collect(self) -> ModelWrite:
        """The shadow alerts and samples of the batches finished so far, in order (the checkpointer's call before
        it writes; it does not wait for the batches still in flight)."""
        while self._in_flight and self._in_flight[0].done():
            self._take(self._in_flight.popleft())
        rows, self._finished = self._finished, ModelWrite()
        return rows

    def replace(self, topic: str, challenger: StreamScorer | None) -> None:
        """At a checkpoint boundary: another challenger (its entities warm up from here), or none."""
        self.settle()
        if challenger is None:
            self.challengers.pop(topic, None)
        else:
            self.challengers[topic] = challenger

    def drop_partition(self, topic: str, partition: int) -> None:
        """A revoked partition: its entities leave the challenger's memory (its next owner re-warms them)."""
        challenger = self.challengers.get(topic)
        if challenger is not None:
            self.settle()
            challenger.store.drop_partition(partition)

    def evict(self, now: float, ttl_s: float, max_live: int) -> None:
        """Idle entities leave the challengers' memory, as the champions' do."""
        self.settle()
        for challenger in self.challengers.values():
            challenger.store.evict_idle(now, ttl_s, max_live)

    def close(self) -> None:
        """Finish the batches in flight and stop the worker (a later batch starts another)."""
        self.settle()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
