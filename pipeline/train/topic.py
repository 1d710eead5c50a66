"""A stream's history from a Kafka topic: the replay reader's range, decoded with the stream's decoder.

The range is by record timestamp, half-open [from, to), as `pipeline replay` reads it. Records that fail
decoding or whose key is not their entity (what the service dead-letters), and resends of a record already
read (what the service drops as duplicates: `duplicate`), are skipped and counted by reason in the model card.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from pipeline.errors import BrokerError, DecodeError
from pipeline.kafka.replay_source import ReplaySource
from pipeline.processing.decode import validate
from pipeline.records import TopicPartition
from pipeline.streams.config import Stream
from pipeline.streams.decode import StreamDecoder
from pipeline.train.data import Origin, TrainingTable

STALL_S = 60.0  # no record position moved for this long: the broker stopped answering


def read_topic(
    stream: Stream,
    bootstrap: str,
    topic: str,
    *,
    from_ms: int | None = None,
    to_ms: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainingTable:
    """progress(records consumed, records in the range) between polls."""
    decoder = StreamDecoder(stream)
    channels = stream.channel_names
    source = ReplaySource(bootstrap, from_ms=from_ms, to_ms=to_ms, client_id="anomaly-train")
    entity_ids: list[str] = []
    ts: list[float] = []
    values: list[list[float]] = []
    origin: list[int] = []
    position: list[int] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()  # dedupe keys: a reading resent by an at-least-once producer is trained on once
    try:
        assigned: list[TopicPartition] = []
        source.subscribe([topic], on_assigned=assigned.extend, on_revoked=lambda _tps: None)
        index = {tp: i for i, tp in enumerate(assigned)}
        for tp in assigned:
            source.seek(tp, 0)
        moved, last_lag = time.monotonic(), None
        while not all(source.caught_up(tp) for tp in assigned):
            for r in source.poll(200, 5000):
                try:
                    rec = validate(decoder.spec, r)  # the key too: a keyless record is dead-lettered by the service
                except DecodeError as exc:
                    skipped[exc.reason] += 1
                    continue
                key = decoder.spec.dedupe_key(rec)
                if key is not None:
                    if key in seen:  # the service drops it too (pipeline.processing.dedupe)
                        skipped["duplicate"] += 1
                        continue
                    seen.add(key)
                entity_ids.append(decoder.spec.entity_of(rec))
                ts.append(rec.timestamp.timestamp())
                values.append([rec.values[c] for c in channels])
                origin.append(index[(r.topic, r.partition)])
                position.append(r.offset)
            lag = source.lag()
            if lag != last_lag:
                moved, last_lag = time.monotonic(), lag
                if progress is not None:
                    progress(source.total() - (lag or 0), source.total())
            elif time.monotonic() - moved > STALL_S:
                raise BrokerError(f"reading {topic!r} from {bootstrap}: no progress for {STALL_S:.0f}s")
    finally:
        source.close()
    return TrainingTable(
        np.asarray(entity_ids, dtype=object),
        np.asarray(ts, np.float64),
        np.asarray(values, np.float64).reshape(len(ts), len(channels)),
        np.asarray(origin, np.int64),
        np.asarray(position, np.int64),
        [Origin(f"{t}[{p}]", "offset") for t, p in assigned],
        dict(skipped),
    )
