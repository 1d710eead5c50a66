"""Label feedback on the real broker and PostgreSQL: a labels topic co-partitioned with the transactions
topic feeds each partition's terminal context. Checks: the contexts equal an offline computation from the
two logs, a labels partition's committed position never passes a label that was not applied, a restart
restores the contexts and re-reads exactly the labels they lack, and a bad label is dead-lettered."""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from models.lstm_ae import LSTMAEConfig, TrainConfig, bundled_checkpoint_path, save_checkpoint
from pipeline.app import build_scorers, build_service, label_topics
from pipeline.errors import ConfigError
from pipeline.features.streams import DAY, TransactionStream
from pipeline.features.terminal import TerminalContext
from pipeline.kafka.client import (
    KafkaDeadLetterSink,
    KafkaSource,
    ensure_topics,
    make_producer,
    produce_json,
    produce_labels,
)
from pipeline.kafka.client import read_topic as read_topic_raw
from pipeline.processor import Processor, ProcessorOptions
from pipeline.replay.core import run_replay
from pipeline.simulate import iso, simulate_transactions, strip_labels
from pipeline.training import train_stream_model
from tests.service_helpers import read_topic
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import PARTITIONS, Runner, settings_for, stop_workers, wait_until

FEEDBACK_TAU = 3 * DAY


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def feedback_model() -> Any:
    spec = TransactionStream(terminal_context=True, fraud_feedback_tau_s=FEEDBACK_TAU)
    recs = strip_labels(simulate_transactions(40, 30, seed=21)[0])
    cols = spec.columns([spec.parse(r) for r in recs], contexts={0: spec.new_context()})
    cfg = LSTMAEConfig(n_features=spec.n_features, window=8, hidden_size=8, latent_size=2, score_features=(0, 8))
    return train_stream_model(spec, cols, model=cfg, train=TrainConfig(epochs=1, seed=0), min_history=1)


def _state(ctx: TerminalContext) -> dict[str, np.ndarray]:
    return {t: np.array([getattr(ctx, a)[i] for a in TerminalContext.ARRAYS]) for t, i in ctx.slots.items()}


def _expected(bootstrap: str, tx_topic: str, labels_topic: str) -> dict[int, TerminalContext]:
    """Each partition's context recomputed offline from the two logs (labels first: they were all queued
    before any payment of this test was processed)."""
    by_part: dict[int, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(read_topic_raw(bootstrap, labels_topic), key=lambda r: (r.partition, r.offset)):
        try:
            lab = orjson.loads(r.value or b"")
            known = _ts(lab["labelled_at"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        d = by_part[r.partition]
        d["off"].append(r.offset)
        d["lt"].append(lab["terminal_id"])
        d["known"].append(known)
        d["fraud"].append(float(lab["is_fraud"]))
    for r in sorted(read_topic_raw(bootstrap, tx_topic), key=lambda r: (r.partition, r.offset)):
        assert r.value is not None
        tx = orjson.loads(r.value)
        d = by_part[r.partition]
        d["tt"].append(tx["terminal_id"])
        d["ts"].append(_ts(tx["timestamp"]))
        d["amt"].append(np.log1p(tx["amount"]))
    out = {}
    for p, d in by_part.items():
        ctx = TerminalContext(DAY, feedback_tau_s=FEEDBACK_TAU)
        ctx.add_labels(d["off"], d["lt"], np.array(d["known"]), np.array(d["fraud"]))
        ctx.features(d["tt"], np.array(d["ts"]), np.array(d["amt"]))
        out[p] = ctx
    return out


def _contexts(proc: Processor, topic: str) -> dict[int, TerminalContext]:
    """The terminal contexts the processor holds in its partitions' states, by partition."""
    return {st.tp[1]: st.context for st in proc.partitions.of_topic(topic) if st.context is not None}


def _assert_same_contexts(got: dict[int, TerminalContext], expected: dict[int, TerminalContext]) -> None:
    assert got.keys() == expected.keys()
    for p, ctx in expected.items():
        want, have = _state(ctx), _state(got[p])
        assert want.keys() == have.keys()
        for t in want:
            np.testing.assert_allclose(have[t], want[t], rtol=1e-12, equal_nan=True)


def _processor(
    settings: Any, ckpt: Any, bootstrap: str, db: SqlTestStore
) -> tuple[Processor, KafkaSource, KafkaDeadLetterSink]:
    scorers = build_scorers(settings, {"transactions": ckpt})
    labels = label_topics(settings, scorers)
    assert labels == {settings.labels_topic: settings.transactions_topic}
    source = KafkaSource(bootstrap, settings.group_id, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    dlq = KafkaDeadLetterSink(bootstrap, settings.dlq_topic)
    opts = ProcessorOptions(run_id="live", group_id=settings.group_id, snapshot_interval_s=0.5)
    return Processor(source, db, dlq, scorers, opts, label_topics=labels), source, dlq


def _run_phase(
    proc: Processor,
    src: KafkaSource,
    dlq: KafkaDeadLetterSink,
    labels_ready: Callable[[], bool],
    bootstrap: str,
    topic: str,
    payments: list[dict[str, Any]],
    db: SqlTestStore,
    group: str,
    durable: int,
) -> None:
    """Run the processor until its labels are queued, then produce `payments` and wait until the topic is
    durable up to `durable` records; stop and close."""
    runner = Runner(proc).start()
    try:
        wait_until(labels_ready, 60, "labels queued")
        producer = make_producer(bootstrap)
        try:
            produce_json(producer, topic, [(r["customer_id"], r) for r in payments])
        finally:
            producer.close()
        wait_until(lambda: sum(_committed(db, group, topic).values()) == durable, 60, "payments durable")
    finally:
        stop_workers([runner], [src, dlq])


def _committed(db: SqlTestStore, group: str, topic: str) -> dict[int, int]:
    return {p: c for (t, p), (c, _) in db.load_offsets("live", group).items() if t == topic}


def test_labels_reach_their_partitions_terminal_context_and_survive_a_restart(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, feedback_model: Any, tmp_path: Path
) -> None:
    s = settings_for(topic_prefix, pg_url)
    s.labels_topic = f"{topic_prefix}-labels"
    ensure_topics(kafka_bootstrap, [s.transactions_topic, s.labels_topic, s.dlq_topic], PARTITIONS)
    txs = strip_labels(simulate_transactions(30, 24, seed=5)[0])
    txs.sort(key=lambda r: r["timestamp"])
    first, second = txs[: len(txs) * 2 // 3], txs[len(txs) * 2 // 3 :]
    compromised = txs[0]["terminal_id"]
    # every payment gets a label one day later: fraud at the compromised terminal, genuine elsewhere
    labels = [
        {
            "transaction_id": r["transaction_id"],
            "customer_id": r["customer_id"],
            "terminal_id": r["terminal_id"],
            "is_fraud": r["terminal_id"] == compromised,
            "labelled_at": iso(_ts(r["timestamp"]) + DAY),
        }
        for r in txs
    ]
    producer = make_producer(kafka_bootstrap)
    try:  # every label to every partition (label fan-out), then one bad record
        n_labels = produce_labels(producer, s.labels_topic, labels, fanout=True)
        produce_json(producer, s.labels_topic, [("C000001", b'{"customer_id": "C000001", "is_fraud": "yes"}')])
    finally:
        producer.close()
    assert n_labels == PARTITIONS * len(labels)

    proc, src, dlq = _processor(s, feedback_model, kafka_bootstrap, pg_store)
    _run_phase(
        proc,
        src,
        dlq,
        lambda: sum(c.pending_labels for c in _contexts(proc, s.transactions_topic).values()) == n_labels,
        kafka_bootstrap,
        s.transactions_topic,
        first,
        pg_store,
        s.group_id,
        len(first),
    )
    expected = _expected(kafka_bootstrap, s.transactions_topic, s.labels_topic)
    _assert_same_contexts(_contexts(proc, s.transactions_topic), expected)
    committed = _committed(pg_store, s.group_id, s.labels_topic)
    for p, ctx in expected.items():
        # the labels partition is durable exactly up to its oldest label not applied yet (the second part's)
        assert ctx.first_pending_offset is not None and committed[p] == ctx.first_pending_offset
    assert 0 < sum(committed.values()) < n_labels
    risky = [c.fb_fraud[c.slots[compromised]] for c in expected.values() if compromised in c.slots]
    assert risky and max(risky) > 0.5  # the compromised terminal's fraud labels were folded in
    dead = read_topic(kafka_bootstrap, s.dlq_topic)
    assert {v["reason"] for _, v in dead} == {"missing_field"}
    assert {v["source"]["topic"] for _, v in dead} == {s.labels_topic}

    # restart: contexts come back from the snapshot, pending labels are re-read, the rest of the payments flow
    db2 = SqlTestStore(pg_url)
    proc2, src2, dlq2 = _processor(s, feedback_model, kafka_bootstrap, db2)
    pending = sum(c.pending_labels for c in expected.values())
    _run_phase(
        proc2,
        src2,
        dlq2,
        lambda: (
            proc2.ready.is_set()
            and len(_contexts(proc2, s.transactions_topic)) == len(expected)
            and sum(c.pending_labels for c in _contexts(proc2, s.transactions_topic).values()) == pending
        ),
        kafka_bootstrap,
        s.transactions_topic,
        second,
        db2,
        s.group_id,
        len(txs),
    )
    # restored context + re-read labels + new payments == one uninterrupted computation over both logs
    expected = _expected(kafka_bootstrap, s.transactions_topic, s.labels_topic)
    _assert_same_contexts(_contexts(proc2, s.transactions_topic), expected)
    committed = _committed(db2, s.group_id, s.labels_topic)
    for p, ctx in expected.items():  # the last day's labels are not due yet
        assert ctx.first_pending_offset is not None and committed[p] == ctx.first_pending_offset
    db2.dispose()

    # a replay of the transactions topic with this model reads the labels topic alongside
    model = save_checkpoint(feedback_model, tmp_path / "transactions.pt")
    res = run_replay(s, kafka_bootstrap, [s.transactions_topic], model=str(model), run_id="replay-fb", db=pg_store)
    assert res.topics == [s.transactions_topic, s.labels_topic]
    assert res.events == len(txs) + n_labels + 1 and res.dead_letters == {"missing_field": 1}


def test_service_refuses_a_labels_topic_with_another_partition_count(
    kafka_bootstrap: str, pg_url: str, topic_prefix: str, feedback_model: Any, tmp_path: Path
) -> None:
    feedback_model.card["terminal_context_partitions"] = PARTITIONS
    try:
        save_checkpoint(feedback_model, tmp_path / "transactions.pt")
    finally:
        del feedback_model.card["terminal_context_partitions"]
    for suffix in (".pt", ".card.json"):
        shutil.copy(bundled_checkpoint_path("sensors").with_suffix(suffix), tmp_path / f"sensors{suffix}")
    s = settings_for(topic_prefix, pg_url)
    s.models_dir, s.labels_topic = tmp_path, f"{topic_prefix}-labels"
    s.alerts_topic, s.run_id = f"{topic_prefix}-alerts", topic_prefix  # a run of its own (the schema is shared)
    ensure_topics(kafka_bootstrap, [s.labels_topic], PARTITIONS // 2)
    with pytest.raises(ConfigError, match="same partition count"):
        build_service(s, kafka_bootstrap, train_if_missing=False)


def test_analyst_verdict_is_published_as_label_feedback(
    kafka_bootstrap: str, pg_store: SqlTestStore, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer
    from typer.testing import CliRunner

    from pipeline.alerts.cli import register
    from pipeline.checkpointing.rows import AlertRow

    tx_topic, labels_topic = f"{topic_prefix}-tx", f"{topic_prefix}-labels"
    monkeypatch.setenv("PIPELINE_LABELS_TOPIC", labels_topic)
    pay = strip_labels(simulate_transactions(2, 3, seed=9)[0])[:2]
    ensure_topics(kafka_bootstrap, [tx_topic], 1)
    producer = make_producer(kafka_bootstrap)
    try:
        produce_json(producer, tx_topic, [(r["customer_id"], r) for r in pay])
    finally:
        producer.close()
    rows = [
        AlertRow(
            f"live|{tx_topic}|0|{i}|m",
            "live",
            "transactions",
            r["customer_id"],
            datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")),
            9.0,
            1.0,
            "high",
            "m",
            [],
            tx_topic,
            0,
            i,
        )
        for i, r in enumerate(pay)
    ]
    pg_store.write_checkpoint("live", "g", rows, [], [])
    second = max(a["id"] for a in pg_store.list_alerts(run_id="live"))
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(
        app,
        [
            "alerts",
            "label",
            str(second),
            "--tp",
            "--publish-label",
            "--json",
            "--bootstrap",
            kafka_bootstrap,
            "--database-url",
            pg_store.url,
        ],
    )
    assert res.exit_code == 0, (res.output, res.exception)
    published = orjson.loads(res.stdout)["published"]
    assert published == {  # fanned out to 4
        "labels": 1,
        "records": PARTITIONS,
        "topic": labels_topic,
        "already_sent": 0,
        "other_verdict_sent": 0,
    }
    got = read_topic(kafka_bootstrap, labels_topic)
    assert len(got) == PARTITIONS and {k for k, _ in got} == {pay[1]["customer_id"].encode()}
    lab = got[0][1]
    assert (lab["transaction_id"], lab["terminal_id"], lab["is_fraud"]) == (
        pay[1]["transaction_id"],
        pay[1]["terminal_id"],
        True,
    )
    assert pg_store.get_alert(second)["label"] == "tp"
    nothing = CliRunner().invoke(
        app,
        ["alerts", "label", str(second), "--fp", "--publish-label", "--database-url", pg_store.url],
        env={"KAFKA_BOOTSTRAP": ""},
    )
    assert nothing.exit_code != 0 and "KAFKA_BOOTSTRAP" in str(nothing.exception)


def test_terminal_contexts_move_with_their_partitions_on_a_rebalance(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, feedback_model: Any
) -> None:
    s = settings_for(topic_prefix, pg_url)
    s.labels_topic = f"{topic_prefix}-labels"
    ensure_topics(kafka_bootstrap, [s.transactions_topic, s.labels_topic, s.dlq_topic], PARTITIONS)
    txs = sorted(strip_labels(simulate_transactions(40, 20, seed=8)[0]), key=lambda r: r["timestamp"])
    first, second = txs[: len(txs) // 2], txs[len(txs) // 2 :]
    bad_terminals = {txs[0]["terminal_id"], txs[1]["terminal_id"]}
    labels = [
        {
            "transaction_id": r["transaction_id"],
            "customer_id": r["customer_id"],
            "terminal_id": r["terminal_id"],
            "is_fraud": r["terminal_id"] in bad_terminals,
            "labelled_at": iso(_ts(r["timestamp"]) + DAY / 2),
        }
        for r in txs
    ]
    producer = make_producer(kafka_bootstrap)
    try:
        produce_labels(producer, s.labels_topic, labels)
        produce_json(producer, s.transactions_topic, [(r["customer_id"], r) for r in first])
    finally:
        producer.close()
    db1, db2 = SqlTestStore(pg_url), SqlTestStore(pg_url)
    w1, src1, dlq1 = _processor(s, feedback_model, kafka_bootstrap, db1)
    w2, src2, dlq2 = _processor(s, feedback_model, kafka_bootstrap, db2)
    r1, r2 = Runner(w1).start(), Runner(w2).start()

    def durable(n: int) -> bool:
        return sum(_committed(pg_store, s.group_id, s.transactions_topic).values()) == n

    try:
        wait_until(
            lambda: (
                len(src1.consumer.assignment()) == len(src2.consumer.assignment()) == PARTITIONS and durable(len(first))
            ),
            60,
            "two workers, each with 2 + 2 partitions, and the first half durable",
        )
        moved = set(_contexts(w2, s.transactions_topic))
        assert len(moved) == PARTITIONS // 2  # w2 built contexts for its own partitions
        r2.stop.set()
        r2.join(30)
        src2.close()  # leaves the group: its partitions, contexts included, go to w1
        wait_until(lambda: len(src1.consumer.assignment()) == 2 * PARTITIONS, 60, "w1 owning every partition")
        producer = make_producer(kafka_bootstrap)
        try:
            produce_json(producer, s.transactions_topic, [(r["customer_id"], r) for r in second])
        finally:
            producer.close()
        wait_until(lambda: durable(len(txs)), 60, "second half durable")
    finally:
        stop_workers([r1, r2], [src1, src2, dlq1, dlq2])
    expected = _expected(kafka_bootstrap, s.transactions_topic, s.labels_topic)
    _assert_same_contexts(_contexts(w1, s.transactions_topic), expected)  # the moved ones continued from w2's snapshots
    committed = _committed(pg_store, s.group_id, s.labels_topic)
    for p, ctx in expected.items():
        assert committed[p] == ctx.first_pending_offset
    db1.dispose()
    db2.dispose()


def test_a_label_from_a_wrong_clock_is_dead_lettered_and_the_labels_behind_it_apply(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, feedback_model: Any
) -> None:
    """A probe sent one label with labelled_at in 2199: it was queued, and since labels apply in labelled_at
    order, every label behind it waited for 2199 (the labels' position stuck, no log line, no metric). Like a
    payment from a wrong clock, it is dead-lettered as from_the_future and the rest apply."""
    s = settings_for(topic_prefix, pg_url)
    s.labels_topic = f"{topic_prefix}-labels"
    ensure_topics(kafka_bootstrap, [s.transactions_topic, s.labels_topic, s.dlq_topic], PARTITIONS)
    txs = sorted(strip_labels(simulate_transactions(20, 10, seed=8)[0]), key=lambda r: r["timestamp"])
    early = iso(_ts(txs[len(txs) // 4]["timestamp"]))
    label = {"customer_id": "C000001", "terminal_id": txs[0]["terminal_id"], "is_fraud": True}
    wrong_clock = {**label, "transaction_id": "FUTURE-1", "labelled_at": "2199-01-01T00:00:00Z"}
    good = [{**label, "transaction_id": f"T-{i}", "labelled_at": early} for i in range(3)]
    producer = make_producer(kafka_bootstrap)
    try:
        n_future = produce_labels(producer, s.labels_topic, [wrong_clock], fanout=True)
        n_good = produce_labels(producer, s.labels_topic, good, fanout=True)
    finally:
        producer.close()
    proc, src, dlq = _processor(s, feedback_model, kafka_bootstrap, pg_store)
    _run_phase(
        proc,
        src,
        dlq,
        lambda: sum(st.label_read or 0 for st in proc.partitions.of_topic(s.labels_topic)) == n_future + n_good,
        kafka_bootstrap,
        s.transactions_topic,
        txs,
        pg_store,
        s.group_id,
        len(txs),
    )
    dead = read_topic(kafka_bootstrap, s.dlq_topic)
    assert [v["reason"] for _, v in dead] == ["from_the_future"] * n_future
    assert sum(c.pending_labels for c in _contexts(proc, s.transactions_topic).values()) == 0
    assert sum(_committed(pg_store, s.group_id, s.labels_topic).values()) == n_future + n_good  # none held back


def test_a_verdict_on_a_declared_payment_stream_is_published_and_a_refusal_changes_nothing(
    kafka_bootstrap: str, pg_store: SqlTestStore, topic_prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A probe's payment stream `cards` (fields card_id, ts) got "no payment alerts to publish": only a stream
    named `transactions` in the built-in layout was published, and the alert was labelled anyway. Now the
    stream file's payment streams are read with their own field names, and a refusal labels nothing."""
    import typer
    from typer.testing import CliRunner

    from pipeline.alerts.cli import register
    from pipeline.checkpointing.rows import AlertRow

    tx_topic, labels_topic = f"{topic_prefix}-cards", f"{topic_prefix}-labels"
    streams = tmp_path / "pay.toml"
    streams.write_text(
        f'[[streams]]\nname = "cards"\ntopic = "{tx_topic}"\nkind = "transactions"\nentity_key = "card_id"\n'
        'time_field = "ts"\nmodel = "bundled:transactions"\n'
    )
    monkeypatch.setenv("PIPELINE_STREAMS_FILE", str(streams))
    monkeypatch.setenv("PIPELINE_LABELS_TOPIC", labels_topic)
    pay = strip_labels(simulate_transactions(2, 3, seed=9)[0])[:1]
    wire = [
        {
            **{k: v for k, v in r.items() if k not in ("customer_id", "timestamp")},
            "card_id": r["customer_id"],
            "ts": r["timestamp"],
        }
        for r in pay
    ]
    ensure_topics(kafka_bootstrap, [tx_topic], 1)
    producer = make_producer(kafka_bootstrap)
    try:
        produce_json(producer, tx_topic, [(r["card_id"], r) for r in wire])
    finally:
        producer.close()
    when = datetime.fromisoformat(pay[0]["timestamp"].replace("Z", "+00:00"))
    alert = AlertRow(
        f"live|{tx_topic}|0|0|m",
        "live",
        "cards",
        pay[0]["customer_id"],
        when,
        9.0,
        1.0,
        "high",
        "m",
        [],
        tx_topic,
        0,
        0,
    )
    sensor = AlertRow("live|plant|0|0|m", "live", "pumps", "pump-1", when, 9.0, 1.0, "high", "m", [], "plant", 0, 0)
    pg_store.write_checkpoint("live", "g", [alert, sensor], [], [])
    ids = {a["stream"]: a["id"] for a in pg_store.list_alerts(run_id="live")}
    app = typer.Typer()
    register(app)
    args = ["--tp", "--publish-label", "--json", "--bootstrap", kafka_bootstrap, "--database-url", pg_store.url]
    res = CliRunner().invoke(app, ["alerts", "label", str(ids["cards"]), *args])
    assert res.exit_code == 0, (res.output, res.exception)
    sent = {"labels": 1, "records": PARTITIONS, "topic": labels_topic, "already_sent": 0, "other_verdict_sent": 0}
    assert orjson.loads(res.stdout)["published"] == sent
    # labelled again: labels add up in the terminal's fraud rate, so the same verdict is not sent twice (a probe's
    # repeated --tp was); another verdict is sent, and the reply says the earlier one still counts
    again = CliRunner().invoke(app, ["alerts", "label", str(ids["cards"]), *args])
    assert again.exit_code == 0, (again.output, again.exception)
    assert orjson.loads(again.stdout)["published"] == {**sent, "labels": 0, "records": 0, "already_sent": 1}
    assert len(read_topic(kafka_bootstrap, labels_topic)) == PARTITIONS
    fp = [a if a != "--tp" else "--fp" for a in args if a != "--json"]
    changed = CliRunner().invoke(app, ["alerts", "label", str(ids["cards"]), *fp])
    assert changed.exit_code == 0, (changed.output, changed.exception)
    assert "1 label(s) sent" in changed.stdout and "other verdict sent earlier for 1 payment(s)" in " ".join(
        changed.stdout.split()
    )
    verdicts = [v["is_fraud"] for _, v in read_topic(kafka_bootstrap, labels_topic)]
    assert (verdicts.count(True), verdicts.count(False)) == (PARTITIONS, PARTITIONS)
    (key, lab), *_ = read_topic(kafka_bootstrap, labels_topic)
    # the label names the card as the stream does (a label with customer_id would be refused on this stream)
    assert (lab["transaction_id"], lab["card_id"], lab["is_fraud"], "customer_id" in lab) == (
        pay[0]["transaction_id"],
        pay[0]["customer_id"],
        True,
        False,
    )
    assert key == pay[0]["customer_id"].encode()
    refused = CliRunner().invoke(app, ["alerts", "label", str(ids["pumps"]), *args])
    assert isinstance(refused.exception, ConfigError) and "no payment alerts to publish" in str(refused.exception)
    assert "nothing was labelled" in str(refused.exception) and pg_store.get_alert(ids["pumps"])["label"] is None
