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


def test_a_readings_dedupe_key_is_its_device_time_and_values_and_the_same_in_every_process() -> None:
    """The window is snapshotted and restored by another process: the key must not depend on the process's
    string-hash seed. A resend (same device, time, values) has the key; another value or time does not."""
    import subprocess
    import sys

    from pipeline.features.streams import SensorStream

    spec = SensorStream(["flow", "vibration"])
    reading = {"device_id": "P-1", "timestamp": "2024-05-01T10:00:00Z", "values": {"flow": 12.5, "vibration": 1.1}}
    key = spec.dedupe_key(spec.parse(reading))
    assert key is not None and key.startswith("P-1\x1f")
    assert spec.dedupe_key(spec.parse({**reading, "values": {"vibration": 1.1, "flow": 12.5, "extra": 3.0}})) == key
    assert spec.dedupe_key(spec.parse({**reading, "values": {"flow": 12.5, "vibration": 1.2}})) != key
    assert spec.dedupe_key(spec.parse({**reading, "timestamp": "2024-05-01T10:00:01Z"})) != key
    code = (
        "from pipeline.features.streams import SensorStream as S; s = S(['flow', 'vibration']); "
        f"print(repr(s.dedupe_key(s.parse({reading!r}))))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": seed}, check=True
        )
        assert out.stdout.strip() == repr(key)
