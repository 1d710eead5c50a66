"""Alert building: pure, from a scored batch to alert rows (shared by the processor and
pipeline.integrations.faust)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import numpy as np

from pipeline.alerts.lifecycle import SEVERITY_BANDS, severity_of
from pipeline.checkpointing.rows import AlertRow
from pipeline.records import RawRecord, TopicPartition
from pipeline.scoring.scorer import ScoreBatch, StreamScorer


def build_alerts(
    run_id: str,
    scorer: StreamScorer,
    recs: Sequence[RawRecord],
    ts: np.ndarray,
    res: ScoreBatch,
    top_features: int = 3,
    tag: Callable[[TopicPartition], str] | None = None,
    bands: Sequence[float] = SEVERITY_BANDS,
) -> list[AlertRow]:
    """Alert rows for a scored batch; the key (run, source position, model version) makes re-inserts of a
    replayed record collapse in the sink. tag(tp): the partition's log-epoch suffix when the alert is built:
    a record of a reset log reuses an old record's offset, its key must not collide with the old record's
    alert. bands: the severity bands of the incident lifecycle, so an alert and its incident agree."""
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
                severity=severity_of(float(res.scores[i]), float(res.thresholds[i]), bands),
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
