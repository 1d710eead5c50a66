"""Terminal context as the service keeps it: one per partition, label feedback queued and applied by event
time, snapshots that restore exactly."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import StateError
from pipeline.features.streams import TransactionStream, make_stream, transaction_stream_for
from pipeline.features.terminal import TerminalContext

DAY = 86400.0


def _traffic(seed: int, n: int = 400) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    terminals = [f"T{int(t)}" for t in rng.integers(0, 12, n)]
    ts = np.sort(rng.uniform(0, 30 * DAY, n))
    return terminals, ts, np.log1p(rng.gamma(2.0, 30.0, n))


def _labels(terminals: list[str], ts: np.ndarray, seed: int) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    fraud = (np.random.default_rng(seed).random(len(ts)) < 0.2).astype(float)
    return np.arange(len(ts)), terminals, ts + 2 * DAY, fraud


def test_queued_label_applies_at_the_first_payment_at_or_after_it_is_known() -> None:
    ctx = TerminalContext(feedback_tau_s=1e12)  # no decay: risk = frauds / (labels + 1)
    ctx.add_labels([10, 11], ["A", "A"], np.array([5.0, 8.0]), np.array([1.0, 1.0]))
    f = ctx.features(["A"] * 4, np.array([4.0, 5.0, 7.0, 8.0]), np.zeros(4))
    assert f[:, 2].tolist() == pytest.approx([0.0, 1 / 2, 1 / 2, 2 / 3])
    assert ctx.pending_labels == 0 and ctx.first_pending_offset is None


def test_a_label_not_yet_due_holds_back_the_ones_behind_it() -> None:
    ctx = TerminalContext(feedback_tau_s=1e12)
    ctx.add_labels([3, 4], ["A", "B"], np.array([100.0, 1.0]), np.array([1.0, 1.0]))
    f = ctx.features(["B"], np.array([50.0]), np.zeros(1))
    assert f[0, 2] == 0.0  # B's label waits behind A's, which is not known until t=100
    assert ctx.first_pending_offset == 3 and ctx.pending_labels == 2
    f = ctx.features(["B"], np.array([100.0]), np.zeros(1))
    assert f[0, 2] == pytest.approx(1 / 2) and ctx.first_pending_offset is None


def test_labels_and_payments_in_one_batch_equal_one_at_a_time() -> None:
    terminals, ts, amount = _traffic(1)
    whole = TerminalContext(feedback_tau_s=3 * DAY)
    whole.add_labels(*_labels(terminals, ts, 2))
    expected = whole.features(terminals, ts, amount)
    split = TerminalContext(feedback_tau_s=3 * DAY)
    split.add_labels(*_labels(terminals, ts, 2))
    got = np.concatenate(
        [split.features(terminals[i : i + 1], ts[i : i + 1], amount[i : i + 1]) for i in range(len(ts))]
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert expected[:, 2].max() > 0.1  # the feedback did reach the feature


def test_snapshot_restores_exactly() -> None:
    terminals, ts, amount = _traffic(3)
    a = TerminalContext(feedback_tau_s=3 * DAY)
    a.add_labels(*_labels(terminals, ts, 4))
    a.features(terminals[:200], ts[:200], amount[:200])
    b = TerminalContext.restore(a.snapshot())
    assert b.same_parameters(a) and len(b) == len(a)
    rest = _labels(terminals, ts, 4)
    b.add_labels(
        rest[0][a.first_pending_offset :],
        rest[1][a.first_pending_offset :],
        rest[2][a.first_pending_offset :],
        rest[3][a.first_pending_offset :],
    )  # re-read from the log
    np.testing.assert_array_equal(
        b.features(terminals[200:], ts[200:], amount[200:]), a.features(terminals[200:], ts[200:], amount[200:])
    )
    empty = TerminalContext.restore(TerminalContext().snapshot())
    assert len(empty) == 0 and empty.feedback_tau_s is None
    with pytest.raises(ValueError, match="truncated"):
        TerminalContext.restore(a.snapshot()[:-8])
    with pytest.raises(ValueError, match="not a terminal-context snapshot"):
        TerminalContext.restore(b"garbage")


def test_each_partition_has_its_own_context() -> None:
    terminals, ts, amount = _traffic(5)
    parts = np.random.default_rng(6).integers(0, 3, len(ts)).astype(np.int32)
    customers = [f"C{i % 7}" for i in range(len(ts))]
    spec = TransactionStream(terminal_context=True, fraud_feedback_tau_s=DAY)
    contexts = {p: spec.new_context() for p in range(3)}
    mixed = spec.columns_from_arrays(customers, ts, np.expm1(amount), terminals, parts, contexts).base
    for p in range(3):
        idx = np.flatnonzero(parts == p)
        alone_spec = TransactionStream(terminal_context=True, fraud_feedback_tau_s=DAY)
        alone = alone_spec.columns_from_arrays(
            [customers[i] for i in idx],
            ts[idx],
            np.expm1(amount[idx]),
            [terminals[i] for i in idx],
            contexts={0: alone_spec.new_context()},
        ).base
        np.testing.assert_array_equal(mixed[idx], alone)
        assert len(contexts[p]) == len({terminals[i] for i in idx})  # each context saw its partition only
    with pytest.raises(ValueError, match="contexts"):  # stateless: the caller holds the partitions' contexts
        spec.columns_from_arrays(customers, ts, np.expm1(amount), terminals, parts)


def test_context_is_restored_from_its_snapshot_and_checked() -> None:
    saved = TerminalContext(feedback_tau_s=DAY)
    saved.features(["T1"], np.array([0.0]), np.array([3.0]))
    spec = TransactionStream(terminal_context=True, fraud_feedback_tau_s=DAY)
    assert len(spec.restore_context(saved.snapshot(), 2)) == 1 and len(spec.restore_context(None, 0)) == 0
    other = TransactionStream(terminal_context=True, fraud_feedback_tau_s=2 * DAY)
    with pytest.raises(StateError, match="other parameters"):
        other.restore_context(saved.snapshot(), 0)
    broken = TransactionStream(terminal_context=True)
    with pytest.raises(StateError, match="partition 0"):
        broken.restore_context(b"garbage", 0)


def test_stream_layout_comes_from_the_model_card() -> None:
    plain = TransactionStream()
    assert isinstance(make_stream("transactions", card={"feature_names": plain.feature_names}), TransactionStream)
    fb = TransactionStream(terminal_context=True, fraud_feedback_tau_s=3 * DAY)
    spec = transaction_stream_for(fb.feature_names, {"terminal_tau_s": 7200.0, "fraud_feedback_tau_s": 3 * DAY})
    assert spec.label_feedback and spec.terminal_tau_s == 7200.0 and spec.feature_names == fb.feature_names
    ctx_only = TransactionStream(terminal_context=True)
    assert not transaction_stream_for(ctx_only.feature_names, {}).label_feedback
    with pytest.raises(ValueError, match="fraud_feedback_tau_s"):
        transaction_stream_for(fb.feature_names, {})
    with pytest.raises(ValueError, match="this build knows"):
        transaction_stream_for(["log_amount", "mystery"], {})


def test_offline_partitioning_matches_the_producers_partitioner() -> None:
    from kafka.partitioner.default import DefaultPartitioner

    from pipeline.kafka.partitioning import partitions_of

    keys = [str(i) for i in range(200)] + ["C000001", "ü-key", "C000001"]
    got = partitions_of(keys, 4)
    part = DefaultPartitioner()
    if hasattr(part, "partition"):  # kafka-python 3.0: partition(topic, key, serialized key, value, ..., cluster)

        class Cluster:
            def topics(self) -> set[str]:
                return {"t"}

            def partitions_for_topic(self, topic: str) -> set[int]:
                return {0, 1, 2, 3}

            available_partitions_for_topic = partitions_for_topic

        want = [part.partition("t", k, k.encode(), None, None, Cluster()) for k in keys]
    else:  # 2.3: part(serialized key, all partitions, available partitions)
        want = [part(k.encode(), [0, 1, 2, 3], [0, 1, 2, 3]) for k in keys]
    assert got.tolist() == want and set(want) == {0, 1, 2, 3}
    assert partitions_of(keys, 1).tolist() == [0] * len(keys)
    with pytest.raises(ValueError):
        partitions_of(keys, 0)


def test_idle_terminals_are_forgotten_without_changing_features() -> None:
    keep, drop = TerminalContext(feedback_tau_s=DAY), TerminalContext(feedback_tau_s=DAY)
    drop.IDLE_TAUS = 30.0
    keep.IDLE_TAUS = 1e9  # never sweeps
    for ctx in (keep, drop):
        ctx.add_labels([0], ["OLD"], np.array([DAY]), np.array([1.0]))
        ctx.features(["OLD", "A"], np.array([0.0, 0.0]), np.array([3.0, 4.0]))
        ctx.features(["A"], np.array([2 * DAY]), np.array([4.0]))
    late = 40 * DAY  # OLD idle for 38 days > 30 taus; A too, B new
    f_keep = keep.features(["B", "A", "OLD"], np.array([late, late + 1, late + 2]), np.array([3.0, 5.0, 2.0]))
    assert len(keep) == 3
    f_drop = drop.features(["B"], np.array([late]), np.array([3.0]))
    assert len(drop) == 1 and "OLD" not in drop.slots  # swept: only the active terminal is kept
    f_drop = np.vstack([f_drop, drop.features(["A", "OLD"], np.array([late + 1, late + 2]), np.array([5.0, 2.0]))])
    np.testing.assert_allclose(f_drop, f_keep, rtol=0, atol=1e-9)
    restored = TerminalContext.restore(drop.snapshot())
    assert sorted(restored.slots) == sorted(drop.slots)
