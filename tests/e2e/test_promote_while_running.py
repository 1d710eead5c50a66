"""Promoting a model version while the processor runs (issue #14, section 3), on the real broker and PostgreSQL
(registry included): the stream switches at a checkpoint boundary, alerts before the switch carry the old
version and after it the new one, none lost or duplicated against an offline one-at-a-time computation split
at the switch, and the entities' scaling survives it (their score statistics, the old version's scores, are
re-learnt by the new one). A promote the stream cannot serve is refused at runtime: the old version keeps
serving, one ERROR line, the refused counter."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from sqlalchemy import text

from models.lstm_ae import load_blob
from pipeline.kafka.client import KafkaDeadLetterSink, KafkaSource, ensure_topics
from pipeline.processing.swap import ModelWatcher
from pipeline.processor import Processor, ProcessorOptions
from pipeline.registry.registry import ModelRegistry
from pipeline.scoring.factory import build_scorer
from pipeline.scoring.scorer import StreamScorer
from pipeline.sinks import Database
from pipeline.sinks.registry import SqlRegistryStore
from pipeline.state.store import SLOT_ARRAYS, STATS, identity, saved_layout
from pipeline.streams.config import Stream, parse_streams
from pipeline.streams.serving import ServedStream, resolve_model
from tests.service_helpers import start_processor, topic_env
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import PARTITIONS, Runner, event_ms, produce_sensors, sensor_records, stop_workers, wait_until

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "sensors.pt"
CHANNELS: list[str] = json.loads(BUNDLED.with_suffix(".card.json").read_text())["feature_names"]
DEVICES, READINGS, SWITCH_AT = 24, 120, 116  # the promote lands inside a fault (readings 113-119 of pump-0002)


def _stream_file(topic: str) -> str:
    channels = "".join(f'[[streams.channels]]\nname = "{c}"\n' for c in CHANNELS)
    return (
        f'[[streams]]\nname = "pumps"\ntopic = "{topic}"\nkind = "sensors"\nentity_key = "device_id"\n'
        f'time_field = "timestamp"\nmodel = "pumps@champion"\n{channels}'
    )


def _stream(topic: str) -> Stream:
    return parse_streams(_stream_file(topic)).streams[0]


def _build(served: ServedStream) -> StreamScorer:
    """As the service builds a stream's scorer (same lateness policy as the Settings default)."""
    return build_scorer(served.spec(), served.model.checkpoint, allowed_lateness_s=60.0)


def _variant(tmp_path: Path, name: str, **card: Any) -> Path:
    """Another model: lower threshold, slightly other weights (other scores), and the card entries given."""
    blob = load_blob(BUNDLED)
    blob["threshold"] *= 0.5
    blob["state_dict"]["to_latent.weight"] = blob["state_dict"]["to_latent.weight"] * 1.02
    blob["card"] = {**blob["card"], "threshold": blob["threshold"], **card}
    path = tmp_path / f"{name}.pt"
    torch.save(blob, path)
    return path


@pytest.fixture()
def registry(pg_store: SqlTestStore) -> Iterator[ModelRegistry]:
    store = SqlRegistryStore(Database(pg_store.url))
    try:
        yield ModelRegistry(store)
    finally:
        store.dispose()


class Service:
    """The processor of one registry-served stream, in a thread, with its model watcher."""

    def __init__(self, bootstrap: str, db: SqlTestStore, registry: ModelRegistry, prefix: str) -> None:
        self.topic, self.group = f"{prefix}-pumps", f"{prefix}-group"
        self.stream = _stream(self.topic)
        ensure_topics(bootstrap, [self.topic, f"{prefix}-dlq"], PARTITIONS)
        scorer = _build(ServedStream(self.stream, resolve_model(self.stream, registry)))
        watcher = ModelWatcher(registry, {self.topic: self.stream}, _build, poll_s=0.2)
        self.source = KafkaSource(bootstrap, self.group, session_timeout_ms=6000, heartbeat_interval_ms=1000)
        self.dlq = KafkaDeadLetterSink(bootstrap, f"{prefix}-dlq")
        # staggered snapshots far apart: the state rows written after the switch are the switch's own snapshot
        options = ProcessorOptions(group_id=self.group, commit_interval_ms=50, snapshot_interval_s=60.0)
        self.processor = Processor(self.source, db, self.dlq, {self.topic: scorer}, options, models=watcher)
        self.db, self.runner = db, Runner(self.processor)

    def __enter__(self) -> Service:
        self.runner.start()
        return self

    def __exit__(self, *exc: object) -> None:
        stop_workers([self.runner], [self.source, self.dlq])

    @property
    def scorer(self) -> StreamScorer:
        return self.processor.scorers[self.topic]

    def durable(self, n: int, what: str) -> None:
        def done() -> bool:
            return sum(c for c, _ in self.db.load_offsets("live", self.group).values()) == n

        wait_until(done, 90, what)


def _swaps(result: str) -> float:
    return REGISTRY.get_sample_value("pipeline_model_swaps_total", {"stream": "pumps", "result": result}) or 0.0


def _epoch(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else datetime.fromisoformat(value).timestamp()


def _one_at_a_time(scorer: StreamScorer, recs: list[dict[str, Any]]) -> dict[tuple[str, float], tuple[str, float]]:
    """(entity, event time) -> (model version, score) of each event the scorer alerts on, fed one by one."""
    out = {}
    for r in recs:
        res = scorer.process(scorer.spec.columns([scorer.spec.parse(r)]))
        if res.is_anomaly[0]:
            out[(r["device_id"], event_ms(r) / 1000.0)] = (scorer.model_version, float(res.scores[0]))
    return out


def _offline(
    stream: Stream,
    registry: ModelRegistry,
    old: str,
    new: str,
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
) -> dict[tuple[str, float], tuple[str, float]]:
    """The alerts of the same events one at a time: `before` by `old`, then `new` taking over its entities."""
    offline_old = _build(ServedStream(stream, resolve_model(stream, registry, old)))
    expected = _one_at_a_time(offline_old, before)
    offline_new = _build(ServedStream(stream, resolve_model(stream, registry, new)))
    offline_new.store.adopt(offline_old.store)
    expected.update(_one_at_a_time(offline_new, after))
    return expected


def _assert_alerts(db: SqlTestStore, expected: dict[tuple[str, float], tuple[str, float]], switch_time: float) -> None:
    """The alerts equal the offline computation: none lost, spurious or duplicated; the old version's before the
    switch, the new one's after."""
    alerts = db.list_alerts(run_id="live")
    positions = [(a["source_partition"], a["source_offset"]) for a in alerts]
    assert len(positions) == len(set(positions)), "an event alerted twice"
    got = {(a["entity_id"], _epoch(a["event_time"])): (a["model_version"], a["score"]) for a in alerts}
    assert set(got) == set(expected), "alerts lost or spurious against the offline computation"
    for key, (version, score) in expected.items():
        assert got[key][0] == version
        assert got[key][1] == pytest.approx(score, rel=1e-4)
    versions = {(t >= switch_time, v) for (_, t), (v, _) in got.items()}
    # one version before the switch, another after it
    assert len(versions) == 2 and len({a for a, _ in versions}) == 2 and len({v for _, v in versions}) == 2, versions


def _entity_states(db: SqlTestStore) -> dict[str, bytes]:
    """The entities' state records (not a partition's rows: its dedupe window '#dedupe:P')."""
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT entity_id, state FROM entity_state WHERE run_id = 'live'"))
        return {r.entity_id: bytes(r.state) for r in rows if not r.entity_id.startswith("#")}


def test_promote_switches_at_a_checkpoint_with_no_event_lost_or_scored_twice(
    kafka_bootstrap: str, pg_store: SqlTestStore, registry: ModelRegistry, topic_prefix: str, tmp_path: Path
) -> None:
    v1 = registry.register(BUNDLED, "pumps")
    v2 = registry.register(_variant(tmp_path, "v2"), "pumps")
    registry.promote(v1, "pumps", expected_channels=CHANNELS)
    recs = sensor_records(DEVICES, READINGS)
    before, after = recs[: DEVICES * SWITCH_AT], recs[DEVICES * SWITCH_AT :]
    applied = _swaps("applied")
    with Service(kafka_bootstrap, pg_store, registry, topic_prefix) as service:
        produce_sensors(kafka_bootstrap, service.topic, before, create=False)
        service.durable(len(before), "the events before the promote durable")
        old = service.scorer
        assert old.model_version == v1
        registry.promote(v2, "pumps", expected_channels=CHANNELS)
        wait_until(
            lambda: service.scorer.model_version == v2, 30, "the running stream switching to the promoted version"
        )
        new = service.scorer
        assert _swaps("applied") == applied + 1
        # the entities' scaling (and the autoencoder's window) survived the switch; their score statistics
        # were the old version's scores, so the new one re-learns them
        for entity, slot in old.store.live().items():
            at = new.store.live()[entity]
            for a in SLOT_ARRAYS:
                if a.carry == STATS:
                    np.testing.assert_array_equal(getattr(new.store, a.name)[at], getattr(old.store, a.name)[slot])
            assert old.store.score_n[slot] > 0 and new.store.score_n[at] == 0
            np.testing.assert_array_equal(new.store.windows(np.array([at])), old.store.windows(np.array([slot])))
        # the next checkpoint snapshots every partition of the stream under the new version
        wanted = {r["device_id"] for r in before}

        def snapshotted_under_v2() -> bool:
            states = _entity_states(pg_store)
            return wanted <= set(states) and all(saved_layout(b, e)[1].model == identity(v2) for e, b in states.items())

        wait_until(snapshotted_under_v2, 30, "the switched stream's state snapshot")
        produce_sensors(kafka_bootstrap, service.topic, after, create=False)
        service.durable(len(recs), "the events after the promote durable")

    expected = _offline(service.stream, registry, v1, v2, before, after)
    assert {v for v, _ in expected.values()} == {v1, v2}
    _assert_alerts(pg_store, expected, event_ms(after[0]) / 1000.0)


def test_pipeline_run_picks_up_a_promoted_version(
    kafka_bootstrap: str, pg_store: SqlTestStore, registry: ModelRegistry, topic_prefix: str, tmp_path: Path
) -> None:
    """`pipeline run` on a stream file whose stream is served from the registry (the wiring in pipeline.app)."""
    v1 = registry.register(BUNDLED, "pumps")
    v2 = registry.register(_variant(tmp_path, "v2"), "pumps")
    registry.promote(v1, "pumps", expected_channels=CHANNELS)
    topic = f"{topic_prefix}-pumps"
    streams_file = tmp_path / "streams.toml"
    streams_file.write_text(_stream_file(topic))
    env = topic_env(topic_prefix, kafka_bootstrap, pg_store.url, STREAMS_FILE=streams_file, MODEL_POLL_S=0.2)
    recs = sensor_records(DEVICES, READINGS)
    before, after = recs[: DEVICES * SWITCH_AT], recs[DEVICES * SWITCH_AT :]
    produce_sensors(kafka_bootstrap, topic, before)
    log_path = tmp_path / "run.log"
    proc = start_processor(env, log_path=log_path)
    try:

        def durable(n: int) -> bool:
            offsets = pg_store.load_offsets("live", env["PIPELINE_GROUP_ID"]).values()
            return sum(c for c, _ in offsets) == n

        wait_until(lambda: durable(len(before)), 120, "the events before the promote durable")
        registry.promote(v2, "pumps", expected_channels=CHANNELS)
        wait_until(lambda: f"{v1} -> {v2}" in log_path.read_text(), 30, "the service switching versions")
        produce_sensors(kafka_bootstrap, topic, after, create=False)
        wait_until(lambda: durable(len(recs)), 60, "the events after the promote durable")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    _assert_alerts(pg_store, _offline(_stream(topic), registry, v1, v2, before, after), event_ms(after[0]) / 1000.0)


def test_a_promote_the_stream_cannot_serve_is_refused_and_the_old_version_keeps_serving(
    kafka_bootstrap: str,
    pg_store: SqlTestStore,
    registry: ModelRegistry,
    topic_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    v1 = registry.register(BUNDLED, "pumps")
    wrong = registry.register(_variant(tmp_path, "wrong", feature_names=CHANNELS[:-1]), "pumps")
    registry.promote(v1, "pumps", expected_channels=CHANNELS)
    recs = sensor_records(DEVICES, 30)
    refused, applied = _swaps("refused"), _swaps("applied")
    with Service(kafka_bootstrap, pg_store, registry, topic_prefix) as service:
        produce_sensors(kafka_bootstrap, service.topic, recs[: DEVICES * 15], create=False)
        service.durable(DEVICES * 15, "the first events durable")
        registry.promote(wrong, "pumps", expected_channels=None)  # nothing to check against: the service refuses
        wait_until(lambda: _swaps("refused") == refused + 1, 30, "the refusal")
        produce_sensors(kafka_bootstrap, service.topic, recs[DEVICES * 15 :], create=False)
        service.durable(len(recs), "all events durable")
        assert service.scorer.model_version == v1
    assert _swaps("applied") == applied and _swaps("refused") == refused + 1, "refused once, not at every poll"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name.endswith(".swap")]
    assert len(errors) == 1 and "'pumps'" in errors[0] and wrong in errors[0] and f"{v1} keeps serving" in errors[0]
    assert f"missing {CHANNELS[-1]}" in errors[0]
    alerts = pg_store.list_alerts(run_id="live")
    assert alerts and {a["model_version"] for a in alerts} == {v1}
