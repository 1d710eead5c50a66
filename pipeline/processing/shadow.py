"""Shadow (challenger) scoring: a stream's challenger model scores the events its champion scored, batched,
after the champion, with the same featurized columns (so a terminal context is stepped once, by the champion).

Its would-be alerts become shadow rows (shadow_alerts, model_version = the challenger's) and its sampled
scores model_score_samples rows, both in the next checkpoint's transaction. Shadow rows never reach the
incident lifecycle, the outbox or the alerts topic. A failure of the challenger never touches the champion's
path: the batch's challenger state is undone, the error logged and counted (pipeline_shadow_errors_total),
nothing dead-lettered.

Challengers come in at start and, when the stream names a registry alias, follow it while running
(pipeline.processing.swap). A challenger keeps its own per-entity state, in memory only: it is never
snapshotted, so after a restart (or a rebalance, or when it starts) its entities re-warm from their next
events (min_history events before a shadow alert), and the comparison with the champion is only like for like
once they have.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from pipeline import metrics
from pipeline.checkpointing import Checkpointer
from pipeline.features.streams import EventColumns
from pipeline.processing import alerts
from pipeline.processing.samples import ScoreSampler, warm_events
from pipeline.records import RawRecord
from pipeline.scoring.scorer import StreamScorer
from pipeline.state.partition import Partitions

log = logging.getLogger(__name__)


class ShadowScoring:
    def __init__(
        self,
        challengers: Mapping[str, StreamScorer],  # topic -> the challenger of its stream
        *,
        run_id: str,
        partitions: Partitions,
        checkpointer: Checkpointer,
        sampler: ScoreSampler,
        top_features: int,
        severity_bands: Sequence[float],
    ) -> None:
        self.challengers = dict(challengers)
        self.run_id, self.partitions, self.checkpointer, self.sampler = run_id, partitions, checkpointer, sampler
        self.top_features, self.severity_bands = top_features, tuple(severity_bands)
        self.scored = 0  # events the challengers scored (this process)

    def score(self, topic: str, recs: Sequence[RawRecord], cols: EventColumns, parts: np.ndarray) -> None:
        """The events the champion of `topic` just scored (recs[i] featurized as row i of cols)."""
        challenger = self.challengers.get(topic)
        if challenger is None or not recs:
            return
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
                self.partitions.tag,
                self.severity_bands,
            )
            samples = self.sampler.rows(challenger, recs, ts, res, warm_events(challenger, res))
        except Exception:  # noqa: BLE001 - the challenger must never affect the champion's path
            undo()
            metrics.SHADOW_ERRORS.labels(stream).inc()
            log.exception(
                "challenger %s of %s failed on a batch of %d events", challenger.model_version, stream, len(recs)
            )
            return
        challenger.store.mark_clean(touched)  # never snapshotted: clean, so idle entities can be evicted
        self.checkpointer.add_shadow(built)
        self.checkpointer.add_samples(samples)
        self.scored += len(recs)
        metrics.SHADOW_SCORED.labels(stream).inc(len(recs))

    def replace(self, topic: str, challenger: StreamScorer | None) -> None:
        """At a checkpoint boundary: another challenger (its entities warm up from here), or none."""
        if challenger is None:
            self.challengers.pop(topic, None)
        else:
            self.challengers[topic] = challenger

    def drop_partition(self, topic: str, partition: int) -> None:
        """A revoked partition: its entities leave the challenger's memory (its next owner re-warms them)."""
        challenger = self.challengers.get(topic)
        if challenger is not None:
            challenger.store.drop_partition(partition)

    def evict(self, now: float, ttl_s: float, max_live: int) -> None:
        """Idle entities leave the challengers' memory, as the champions' do."""
        for challenger in self.challengers.values():
            challenger.store.evict_idle(now, ttl_s, max_live)
