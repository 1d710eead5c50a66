"""The per-partition dedupe window (pipeline.state.partition.RecentIds): bounded, exact within the window, and
restored from its snapshot to the same decisions."""

from __future__ import annotations

import pytest

from pipeline.errors import StateError
from pipeline.state.partition import RecentIds, dedupe_key


def test_window_remembers_the_last_cap_ids_only() -> None:
    w = RecentIds(3)
    assert [w.seen(t) for t in ["a", "b", "a", "c", "d"]] == [False, False, True, False, False]
    assert list(w.order) == ["b", "c", "d"] and w.ids == {"b", "c", "d"}
    assert not w.seen("a")  # fell out of the window: a resend this late is scored again (bounded memory)
    assert w.seen("d")


def test_snapshot_restores_the_same_decisions() -> None:
    w = RecentIds(100)
    ids = [f"T{i}" for i in range(150)] + ['with "quotes"\n and newline', "ü"]
    for t in ids:
        w.seen(t)
    back = RecentIds.restore(100, w.snapshot())
    assert list(back.order) == list(w.order)
    assert [back.seen(t) for t in ids] == [w.seen(t) for t in ids]
    assert list(RecentIds.restore(10, w.snapshot()).order) == list(w.order)[-10:]  # a smaller window later
    assert len(RecentIds.restore(5, None).order) == 0
    with pytest.raises(StateError):
        RecentIds.restore(5, b'{"not": "a list"}')
    assert dedupe_key(3) == "#dedupe:3"


def test_a_forgotten_id_is_new_again_and_the_rest_keep_their_order() -> None:
    w = RecentIds(3)
    for t in ["a", "b", "c"]:
        w.seen(t)
    w.forget("b")
    w.forget("never-seen")  # nothing to forget: no error
    assert list(w.order) == ["a", "c"] and w.ids == {"a", "c"}
    assert not w.seen("b")  # the corrected resend of a payment that was never scored
    assert list(RecentIds.restore(3, w.snapshot()).order) == ["a", "c", "b"]
