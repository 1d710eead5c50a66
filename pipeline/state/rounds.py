"""Rounds of a micro-batch: round r holds every key's r-th event, so the keys inside one round are distinct and
one vectorised numpy step per round gives exactly the result of applying the events one at a time.

Entity state (pipeline.scoring.scorer) and terminal context (pipeline.features.terminal) both step this way.
"""

from __future__ import annotations

import numpy as np


def occurrence_rank(keys: np.ndarray) -> np.ndarray:
    """rank[i] = how many earlier events in the batch have the same key (slot)."""
    order = np.argsort(keys, kind="stable")
    s = keys[order]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(s)]))
    rank = np.empty(len(keys), np.int64)
    rank[order] = np.arange(len(s)) - group_start
    return rank


def rounds(rank: np.ndarray) -> list[np.ndarray]:
    """Event indices per round (round r = the events of rank r), each in batch order."""
    if len(rank) == 0:
        return []
    order = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[order], np.arange(int(rank.max()) + 2))
    return [order[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)]
