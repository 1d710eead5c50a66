"""Score samples: a deterministic share of every model's scored events (champion and challenger), tagged with
the model version, for `pipeline models drift|compare` (model_score_samples).

An event is picked by a hash of its topic, partition and offset, never by chance: a replay picks the same
events (and the sink ignores a sample it already holds), and champion and challenger sample the same events,
so compare sees paired scores. Only events of warm entities (at least min_history events, as the threshold
judges them) are sampled: before that an entity's window is not full and its score says nothing about the
distribution the model card describes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np

from pipeline.checkpointing.rows import ModelScoreRow
from pipeline.records import RawRecord
from pipeline.scoring.scorer import ScoreBatch, StreamScorer
from pipeline.state.rounds import occurrence_rank

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def uniform_hash(topic: str, partitions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """A value in [0, 1) per (topic, partition, offset), the same in every process (splitmix64 finalizer)."""
    with np.errstate(over="ignore"):
        x = offsets.astype(np.uint64) * _GOLDEN
        x ^= (partitions.astype(np.uint64) + np.uint64(1)) * _MIX2
        x ^= np.uint64(zlib.crc32(topic.encode()))
        x ^= x >> np.uint64(30)
        x *= _MIX1
        x ^= x >> np.uint64(27)
        x *= _MIX2
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def warm_events(scorer: StreamScorer, res: ScoreBatch) -> np.ndarray:
    """(N,) bool: the event's entity had at least min_history events when it was scored (read after the batch
    from each entity's count, less its later events in the batch)."""
    slots = res.slots
    if len(slots) == 0:
        return np.zeros(0, bool)
    _, inverse, per_slot = np.unique(slots, return_inverse=True, return_counts=True)
    later = per_slot[inverse] - occurrence_rank(slots) - 1
    return np.asarray(scorer.store.count[slots] - later >= scorer.min_history)


class ScoreSampler:
    def __init__(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"score sample rate must lie in [0, 1], got {rate}")
        self.rate = rate

    def rows(
        self,
        scorer: StreamScorer,
        recs: Sequence[RawRecord],
        ts: np.ndarray,
        res: ScoreBatch,
        warm: np.ndarray,
    ) -> list[ModelScoreRow]:
        """The sampled events of a scored batch (recs[i] scored as res[i]) as rows of the scorer's version."""
        if self.rate <= 0.0 or not recs:
            return []
        parts = np.fromiter((r.partition for r in recs), np.int64, len(recs))
        offsets = np.fromiter((r.offset for r in recs), np.int64, len(recs))
        picked = np.flatnonzero((uniform_hash(recs[0].topic, parts, offsets) < self.rate) & warm)
        stream, version = scorer.spec.name, scorer.model_version
        return [
            ModelScoreRow(
                stream=stream,
                model_version=version,
                entity_id=res.entity_ids[i],
                event_time=datetime.fromtimestamp(float(ts[i]), tz=timezone.utc),
                score=float(res.raw_scores[i]),
                source_topic=recs[i].topic,
                source_partition=recs[i].partition,
                source_offset=recs[i].offset,
            )
            for i in picked.tolist()
        ]
