"""The processor holds payments until their partition's labels have been read up to the payments' time, so
features do not depend on which topic a poll happened to return first (replays, catch-up after downtime).
The Source here is an in-memory log (the processor codes against pipeline.records.Source); the same path
runs on the real broker in tests/integration/test_label_feedback.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from models.lstm_ae import LSTMAEConfig, TrainConfig
from pipeline.app import build_scorers, label_topics
from pipeline.config import Settings
from pipeline.features.streams import DAY, TransactionStream
from pipeline.features.terminal import TerminalContext
from pipeline.processor import Processor, ProcessorOptions
from pipeline.records import AssignCallback, RawRecord, TopicPartition
from pipeline.simulate import iso, simulate_transactions, strip_labels
from pipeline.training import train_stream_model
from tests.sql_helpers import SqlTestStore


class MemoryLog:
    """Scripted polls over fixed logs: `caught_up` is true once a partition's last record was returned."""

    def __init__(self, ends: Mapping[TopicPartition, int], polls: list[list[RawRecord]]) -> None:
        self.ends, self.polls = dict(ends), polls
        self.read: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()

    def subscribe(self, topics: Sequence[str], on_assigned: AssignCallback, on_revoked: AssignCallback) -> None:
        on_assigned([tp for tp in self.ends if tp[0] in topics])

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        out = self.polls.pop(0) if self.polls else []
        for r in out:
            self.read[(r.topic, r.partition)] = r.offset + 1
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.read[tp] = offset

    def committed(self, tp: TopicPartition) -> int | None:
        return None

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        pass

    def lag(self) -> int | None:
        return sum(e - self.read.get(tp, 0) for tp, e in self.ends.items())

    def caught_up(self, tp: TopicPartition) -> bool:
        return self.read.get(tp, 0) >= self.ends[tp]

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)

    def close(self) -> None:
        pass


class ListDeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[RawRecord, str]] = []

    def send(self, record: RawRecord, reason: str, detail: str) -> None:
        self.sent.append((record, reason))

    def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def model() -> Any:
    spec = TransactionStream(terminal_context=True, fraud_feedback_tau_s=3 * DAY)
    recs = strip_labels(simulate_transactions(20, 20, seed=2)[0])
    cfg = LSTMAEConfig(n_features=spec.n_features, window=4, hidden_size=4, latent_size=2, score_features=(0, 8))
    return train_stream_model(
        spec,
        spec.columns([spec.parse(r) for r in recs], contexts={0: spec.new_context()}),
        model=cfg,
        train=TrainConfig(epochs=1),
        min_history=1,
    )


def _ts(rec: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()


def _labels(txs: list[dict[str, Any]], *, fraud_every: int, entity_key: str = "customer_id") -> list[dict[str, Any]]:
    """A label for every payment, known a day later; every `fraud_every`-th one fraud."""
    return [
        {
            "transaction_id": r["transaction_id"],
            entity_key: r["customer_id"],
            "terminal_id": r["terminal_id"],
            "is_fraud": i % fraud_every == 0,
            "labelled_at": iso(_ts(r) + DAY),
        }
        for i, r in enumerate(txs)
    ]


def test_payments_wait_for_their_labels_then_match_the_offline_features(model: Any, tmp_path: Path) -> None:
    txs = sorted(strip_labels(simulate_transactions(6, 30, seed=4)[0]), key=lambda r: r["timestamp"])
    labels = _labels(txs, fraud_every=3)
    tx = [RawRecord("tx", 0, i, r["customer_id"].encode(), orjson.dumps(r), 0) for i, r in enumerate(txs)]
    lab = [RawRecord("labels", 0, i, r["customer_id"].encode(), orjson.dumps(r), 0) for i, r in enumerate(labels)]
    half = len(lab) // 2
    # payments first, then the labels in two polls: without alignment most payments would see no label
    src = MemoryLog({("tx", 0): len(tx), ("labels", 0): len(lab)}, [tx, lab[:half], lab[half:]])
    settings = Settings(device="cpu", transactions_topic="tx", labels_topic="labels")
    scorers = build_scorers(settings, {"transactions": model})
    db = SqlTestStore(f"sqlite:///{tmp_path / 'a.db'}")
    db.create_schema()
    proc = Processor(
        src,
        db,
        ListDeadLetters(),
        scorers,
        ProcessorOptions(max_batch_records=10),
        label_topics=label_topics(settings, scorers),
    )
    proc.source.subscribe(["tx", "labels"], proc.on_assigned, proc.on_revoked)
    pos = proc.partitions

    proc.handle(src.poll(0, 0))
    assert proc.stats.scored == 0 and proc.holding == len(tx)  # no label read yet: every payment waits
    assert pos.consumed[("tx", 0)] == 0  # and its position does not pass them
    assert src.paused == {("tx", 0)}  # more than 2 x max_batch_records waiting: fetching pauses
    proc.handle(src.poll(0, 0))
    last_label = lab[half - 1].value
    assert last_label is not None
    mark = orjson.loads(last_label)["labelled_at"]
    released = sum(1 for r in txs if r["timestamp"] <= mark)
    assert proc.stats.scored == released > 0 and proc.holding == len(tx) - released
    assert pos.consumed[("tx", 0)] == released
    proc.handle(src.poll(0, 0))  # labels read to the end: the rest goes
    assert proc.stats.scored == len(tx) and proc.holding == 0 and not src.paused
    assert pos.consumed[("tx", 0)] == len(tx)

    want = TerminalContext(DAY, feedback_tau_s=3 * DAY)
    want.add_labels(
        np.arange(len(labels)),
        [r["terminal_id"] for r in labels],
        np.array([_ts({"timestamp": r["labelled_at"]}) for r in labels]),
        np.array([float(r["is_fraud"]) for r in labels]),
    )
    want.features(
        [r["terminal_id"] for r in txs], np.array([_ts(r) for r in txs]), np.log1p(np.array([r["amount"] for r in txs]))
    )
    spec = scorers["tx"].spec
    assert isinstance(spec, TransactionStream)
    got = proc.partitions[("tx", 0)].context
    assert got is not None
    assert got.slots.keys() == want.slots.keys() and got.fb_n[: len(want)].sum() > 0
    for name in TerminalContext.ARRAYS:
        np.testing.assert_allclose(
            getattr(got, name)[: len(got)],
            getattr(want, name)[: len(want)][[want.slots[t] for t in got.slots]],
            rtol=1e-12,
            equal_nan=True,
        )
    assert pos.consumed[("labels", 0)] == want.first_pending_offset  # the last day's labels are not due yet
    db.dispose()


def test_a_renamed_payment_stream_reads_its_labels_by_its_own_entity_field(model: Any, tmp_path: Path) -> None:
    """Labels had to name the customer `customer_id` even where the stream file calls it `card_id`, and a label
    written as the stream's own records are was dead-lettered. Now labels use the payments stream's field."""
    from pipeline.app import scorer_for
    from pipeline.features.streams import StreamIdentity

    txs = sorted(strip_labels(simulate_transactions(4, 10, seed=5)[0]), key=lambda r: r["timestamp"])
    cards = [{**{k: v for k, v in r.items() if k != "customer_id"}, "card_id": r["customer_id"]} for r in txs]
    labels = _labels(txs, fraud_every=2, entity_key="card_id")
    old_style = {**{k: v for k, v in labels[0].items() if k != "card_id"}, "customer_id": txs[0]["customer_id"]}
    tx = [RawRecord("tx", 0, i, r["card_id"].encode(), orjson.dumps(r), 0) for i, r in enumerate(cards)]
    lab = [
        RawRecord("labels", 0, i, r.get("card_id", r.get("customer_id", "")).encode(), orjson.dumps(r), 0)
        for i, r in enumerate([*labels, old_style])
    ]
    src = MemoryLog({("tx", 0): len(tx), ("labels", 0): len(lab)}, [lab, tx])
    settings = Settings(device="cpu", transactions_topic="tx", labels_topic="labels")
    spec = TransactionStream(
        terminal_context=True, fraud_feedback_tau_s=3 * DAY, identity=StreamIdentity("cards", "card_id")
    )
    scorers = {"tx": scorer_for(settings, spec, model)}
    db = SqlTestStore(f"sqlite:///{tmp_path / 'a.db'}")
    db.create_schema()
    dead = ListDeadLetters()
    proc = Processor(src, db, dead, scorers, ProcessorOptions(), label_topics=label_topics(settings, scorers))
    proc.source.subscribe(["tx", "labels"], proc.on_assigned, proc.on_revoked)
    proc.handle(src.poll(0, 0))
    proc.handle(src.poll(0, 0))
    assert [(r.offset, reason) for r, reason in dead.sent] == [(len(labels), "schema_violation")]
    assert proc.stats.scored == len(tx) and proc.holding == 0
    got = proc.partitions[("tx", 0)].context
    assert got is not None and got.fb_n[: len(got)].sum() > 0  # the labels reached the terminals' fraud rates
    db.dispose()
