"""Which partition a keyed record lands in: kafka-python's default partitioner (murmur2, as the Java client),
for code that must reproduce the service's partitioning offline (per-partition terminal context in training)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from kafka.partitioner.default import murmur2


def partitions_of(keys: Sequence[str], n_partitions: int) -> np.ndarray:
    """(N,) int32 partition of each UTF-8 key on a topic with `n_partitions` partitions."""
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be >= 1, got {n_partitions}")
    if n_partitions == 1:
        return np.zeros(len(keys), np.int32)
    cache: dict[str, int] = {}
    out = np.empty(len(keys), np.int32)
    for i, k in enumerate(keys):
        p = cache.get(k)
        if p is None:
            p = cache[k] = (murmur2(k.encode()) & 0x7FFFFFFF) % n_partitions
        out[i] = p
    return out
