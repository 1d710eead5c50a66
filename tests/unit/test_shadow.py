"""Shadow scoring and score samples through the real Processor (an in-memory log, SQLite): the challenger's
shadow alerts and samples equal an offline run of the challenger scorer on the same events, its failure leaves
the champion's path alone, and sampling is deterministic and idempotent across a replay. The same path on the
real broker and PostgreSQL: tests/integration/test_shadow_rows.py."""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from models.lstm_ae import Checkpoint, save_checkpoint
from pipeline.app import build_scorers, challenger_scorers, ensure_models, served_streams, stream_scorers
from pipeline.checkpointing.rows import AlertRow, ModelScoreRow, ModelWrite
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.processing.samples import ScoreSampler, uniform_hash, warm_events
from pipeline.processor import Processor, ProcessorOptions
from pipeline.records import RawRecord
from pipeline.scoring.scorer import ScoreBatch, StreamScorer
from pipeline.sinks.tables import model_score_samples, shadow_alerts
from pipeline.streams.config import load_streams
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import sensor_records
from tests.unit.test_label_alignment import ListDeadLetters, MemoryLog

TOPIC = "s"
PARTS = 2
RATE = 0.3


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(device="cpu", sensors_topic=TOPIC)


@pytest.fixture(scope="module")
def champion_model(settings: Settings) -> Checkpoint:
    ckpt = ensure_models(settings)["sensors"]
    assert isinstance(ckpt, Checkpoint)
    return ckpt


@pytest.fixture(scope="module")
def challenger_model(champion_model: Checkpoint) -> Checkpoint:
    """The champion's network with a lower threshold: more alerts, a different version."""
    card = {**champion_model.card, "version": "sensors-challenger"}
    return replace(champion_model, card=card, threshold=champion_model.threshold * 0.6)


@pytest.fixture(scope="module")
def records() -> list[RawRecord]:
    """Simulated readings (spikes and a drift), keyed by device onto PARTS partitions, offsets per partition."""
    out: list[RawRecord] = []
    next_offset = [0] * PARTS
    for r in sensor_records(8, 120):
        p = zlib.crc32(r["device_id"].encode()) % PARTS
        out.append(RawRecord(TOPIC, p, next_offset[p], r["device_id"].encode(), orjson.dumps(r), 0))
        next_offset[p] += 1
    return out


def _scorer(settings: Settings, model: Checkpoint) -> StreamScorer:
    return build_scorers(settings, {"sensors": model})[TOPIC]


def _processor(
    settings: Settings,
    db: SqlTestStore,
    records: Sequence[RawRecord],
    polls: list[list[RawRecord]],
    challenger: StreamScorer | None,
    champion: Checkpoint,
    max_in_flight: int = 8,
) -> tuple[Processor, ListDeadLetters]:
    ends = {(TOPIC, p): sum(1 for r in records if r.partition == p) for p in range(PARTS)}
    dead = ListDeadLetters()
    proc = Processor(
        MemoryLog(ends, polls),
        db,
        dead,
        {TOPIC: _scorer(settings, champion)},
        ProcessorOptions(max_batch_records=50, score_sample_rate=RATE, shadow_max_in_flight=max_in_flight),
        challengers=None if challenger is None else {TOPIC: challenger},
    )
    proc.source.subscribe([TOPIC], proc.on_assigned, proc.on_revoked)
    return proc, dead


def _run(proc: Processor, polls: int) -> None:
    """The polls, then a checkpoint after the challenger finished them (as a graceful stop makes one)."""
    for _ in range(polls):
        proc.handle(proc.source.poll(0, 0))
    proc.shadow.settle()
    proc.checkpointer.checkpoint(snapshot=True)


def _polls(records: Sequence[RawRecord], size: int = 50) -> list[list[RawRecord]]:
    return [list(records[i : i + size]) for i in range(0, len(records), size)]


def _offline(scorer: StreamScorer, records: Sequence[RawRecord]) -> tuple[ScoreBatch, np.ndarray]:
    """The scorer on every event in one batch (exactly the result of one event at a time), and the warm mask."""
    spec = scorer.spec
    cols = spec.columns([spec.decode(r.value) for r in records])
    res = scorer.process(cols, np.array([r.partition for r in records]))
    return res, warm_events(scorer, res)


def _db(tmp_path: Path, name: str = "a.db") -> SqlTestStore:
    db = SqlTestStore(f"sqlite:///{tmp_path / name}")
    db.create_schema()
    return db


def _rows(db: SqlTestStore, table: Any, version: str) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        q = select(table).where(table.c.model_version == version)
        return [dict(m) for m in conn.execute(q).mappings()]


def test_shadow_alerts_and_samples_equal_an_offline_run_of_the_challenger(
    settings: Settings,
    champion_model: Checkpoint,
    challenger_model: Checkpoint,
    records: list[RawRecord],
    tmp_path: Path,
) -> None:
    db = _db(tmp_path)
    polls = _polls(records)
    proc, dead = _processor(settings, db, records, polls, _scorer(settings, challenger_model), champion_model)
    _run(proc, len(polls))
    assert not dead.sent and proc.shadow is not None and proc.shadow.scored == len(records)

    res, warm = _offline(_scorer(settings, challenger_model), records)
    version = challenger_model.version
    want = {
        (records[i].partition, records[i].offset, round(float(res.scores[i]), 9))
        for i in np.flatnonzero(res.is_anomaly)
    }
    got = {(a["source_partition"], a["source_offset"], round(a["score"], 9)) for a in _rows(db, shadow_alerts, version)}
    assert want and got == want
    # the champion's alerts are its own (fewer: the challenger's threshold is lower), never the shadow's
    champion_alerts = db.list_alerts(run_id="live")
    assert 0 < len(champion_alerts) < len(got)
    assert {a["model_version"] for a in champion_alerts} == {champion_model.version}

    parts = np.array([r.partition for r in records])
    offsets = np.array([r.offset for r in records])
    picked = np.flatnonzero((uniform_hash(TOPIC, parts, offsets) < RATE) & warm)
    want_samples = {(res.entity_ids[i], round(float(res.raw_scores[i]), 9)) for i in picked.tolist()}
    samples = _rows(db, model_score_samples, version)
    assert len(samples) == len(picked) and {(s["entity_id"], round(s["score"], 9)) for s in samples} == want_samples
    # the champion samples the same events (paired scores for compare)
    assert len(_rows(db, model_score_samples, champion_model.version)) == len(picked)


def _gated(challenger: StreamScorer, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The challenger's batches wait until the returned event is set (a challenger slower than the champion)."""
    gate = threading.Event()
    real = challenger.process

    def waits_for_the_gate(*args: Any, **kwargs: Any) -> ScoreBatch:
        assert gate.wait(30), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(challenger, "process", waits_for_the_gate)
    return gate


def test_a_checkpoint_does_not_wait_for_the_challenger_and_its_late_rows_are_written(
    settings: Settings,
    champion_model: Checkpoint,
    challenger_model: Checkpoint,
    records: list[RawRecord],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = _db(tmp_path)
    polls = _polls(records)
    n_polls = len(polls)
    challenger = _scorer(settings, challenger_model)
    gate = _gated(challenger, monkeypatch)
    proc, dead = _processor(settings, db, records, polls, challenger, champion_model)
    for _ in range(3):
        proc.handle(proc.source.poll(0, 0))
    proc.checkpointer.checkpoint(snapshot=True)  # the challenger has not finished a batch yet
    assert proc.partitions.committed == proc.partitions.consumed and sum(proc.partitions.committed.values()) == 150
    assert not _rows(db, shadow_alerts, challenger_model.version)

    gate.set()
    for _ in range(3, n_polls):
        proc.handle(proc.source.poll(0, 0))
    proc.shadow.settle()
    proc.checkpointer.checkpoint(snapshot=True)
    # the rows of the first batches came after their events' positions were committed, and none was dropped
    res, _ = _offline(_scorer(settings, challenger_model), records)
    want = {(records[i].partition, records[i].offset) for i in np.flatnonzero(res.is_anomaly)}
    got = {(a["source_partition"], a["source_offset"]) for a in _rows(db, shadow_alerts, challenger_model.version)}
    assert not dead.sent and proc.shadow.scored == len(records) and want and got == want
    assert {(p, o) for p, o in want if o < 75} & got  # some of them from the first three polls


def test_the_champion_waits_only_when_the_challenger_is_max_in_flight_batches_behind(
    settings: Settings,
    champion_model: Checkpoint,
    challenger_model: Checkpoint,
    records: list[RawRecord],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    challenger = _scorer(settings, challenger_model)
    gate = _gated(challenger, monkeypatch)
    proc, _ = _processor(settings, _db(tmp_path), records, _polls(records), challenger, champion_model, max_in_flight=2)
    for _ in range(2):  # two batches behind: the champion goes on
        proc.handle(proc.source.poll(0, 0))
    assert not gate.is_set() and proc.shadow.scored == 0
    opener = threading.Timer(0.5, gate.set)
    opener.start()
    started = time.monotonic()
    proc.handle(proc.source.poll(0, 0))  # a third: it waits for the oldest
    assert time.monotonic() - started >= 0.4 and proc.shadow.scored == 50
    opener.join()


def test_a_failing_challenger_leaves_the_champion_path_alone(
    settings: Settings,
    champion_model: Checkpoint,
    challenger_model: Checkpoint,
    records: list[RawRecord],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clean_db, broken_db = _db(tmp_path, "clean.db"), _db(tmp_path, "broken.db")
    polls = _polls(records)
    clean, _ = _processor(settings, clean_db, records, list(polls), None, champion_model)
    _run(clean, len(polls))

    challenger = _scorer(settings, challenger_model)
    calls = {"n": 0}
    real = challenger.process

    def every_other_batch_fails(*args: Any, **kwargs: Any) -> ScoreBatch:
        calls["n"] += 1
        res = real(*args, **kwargs)  # the state is changed, then the batch fails: it must be undone
        if calls["n"] % 2 == 0:
            raise RuntimeError("challenger broke")
        return res

    monkeypatch.setattr(challenger, "process", every_other_batch_fails)
    before = _shadow_errors()
    broken, dead = _processor(settings, broken_db, records, list(polls), challenger, champion_model)
    _run(broken, len(polls))

    assert not dead.sent  # nothing dead-lettered for the challenger's failures
    assert _shadow_errors() - before == len(polls) // 2
    key = ("entity_id", "source_partition", "source_offset", "score", "model_version")
    assert [tuple(a[k] for k in key) for a in broken_db.list_alerts(run_id="live")] == [
        tuple(a[k] for k in key) for a in clean_db.list_alerts(run_id="live")
    ]
    # the failed batches' challenger state was undone: an entity's count is its events in the good batches
    good = [r for i, batch in enumerate(polls) if i % 2 == 0 for r in batch]
    spec = challenger.spec
    per_entity: dict[str, int] = {}
    for r in good:
        eid = spec.decode(r.value).device_id
        per_entity[eid] = per_entity.get(eid, 0) + 1
    store = challenger.store
    assert {e: int(store.count[store.resolve([e])[0]]) for e in per_entity} == per_entity


def test_samples_are_deterministic_and_idempotent_across_a_replay(
    settings: Settings,
    champion_model: Checkpoint,
    challenger_model: Checkpoint,
    records: list[RawRecord],
    tmp_path: Path,
) -> None:
    db = _db(tmp_path)
    polls = _polls(records)
    half = len(polls) // 2
    first, _ = _processor(settings, db, records, polls[:half], _scorer(settings, challenger_model), champion_model)
    _run(first, half)  # a checkpoint with a state snapshot at half the log
    for batch in polls[half:]:
        first.handle(batch)
    first.shadow.settle()
    first.checkpointer.checkpoint(snapshot=False)  # committed at the end, the snapshot stays at half

    def stored() -> dict[str, list[tuple[str, str, float]]]:
        out = {}
        for v in (champion_model.version, challenger_model.version):
            rows = _rows(db, model_score_samples, v)
            out[v] = sorted((r["entity_id"], str(r["event_time"]), r["score"]) for r in rows)
        return out

    once = stored()
    assert all(once.values())
    # a restart: the new worker resumes from the snapshot and replays the second half up to the committed end
    replay = [r for batch in polls[half:] for r in batch]
    second, _ = _processor(settings, db, records, _polls(replay), _scorer(settings, challenger_model), champion_model)
    _run(second, len(_polls(replay)))
    assert second.stats.rebuilt == len(replay) and second.stats.scored == 0  # all replayed: state rebuilt, nothing new
    assert stored() == once

    # and a store that gets the same samples and shadow alerts again keeps one of each
    rows = [
        ModelScoreRow("sensors", "v-test", "dev-1", _utc(1_600_000_000.0 + i), float(i), TOPIC, 0, i) for i in range(5)
    ]
    with db.engine.connect() as conn:
        n_shadow = conn.execute(select(func.count()).select_from(shadow_alerts)).scalar_one()
    shadow = _rows(db, shadow_alerts, challenger_model.version)[:3]
    again = ModelWrite([_alert_row(a) for a in shadow], rows)
    db.write_checkpoint("live", "g", [], [], [], models=again)
    db.write_checkpoint("live", "g", [], [], [], models=again)
    assert len(_rows(db, model_score_samples, "v-test")) == 5
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(shadow_alerts)).scalar_one() == n_shadow


def test_sampling_is_a_fixed_share_picked_by_position() -> None:
    parts = np.repeat(np.arange(4), 50_000)
    offsets = np.tile(np.arange(50_000), 4)
    u = uniform_hash("sensors", parts, offsets)
    assert np.array_equal(u, uniform_hash("sensors", parts, offsets))  # the same events on every run
    assert abs((u < 0.01).mean() - 0.01) < 0.002 and abs((u < 0.5).mean() - 0.5) < 0.01
    assert not np.array_equal(u < 0.01, uniform_hash("other-topic", parts, offsets) < 0.01)
    with pytest.raises(ValueError, match="sample rate"):
        ScoreSampler(1.5)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _alert_row(stored: dict[str, Any]) -> AlertRow:
    names = {f.name for f in fields(AlertRow)}
    return AlertRow(**{k: v for k, v in stored.items() if k in names})


def _shadow_errors() -> float:
    return REGISTRY.get_sample_value("pipeline_shadow_errors_total", {"stream": "sensors"}) or 0.0


def _stream_file(tmp_path: Path, challenger: Path) -> Path:
    """The bundled stream file's sensors stream with a challenger checkpoint file."""
    bundled = (Path(__file__).parents[2] / "pipeline" / "streams" / "default.toml").read_text()
    sensors = bundled[bundled.index('[[streams]]\nname = "sensors"') :]
    path = tmp_path / "streams.toml"
    path.write_text(
        sensors.replace('model = "bundled:sensors"', f'model = "bundled:sensors"\nchallenger = "{challenger}"')
    )
    return path


def test_the_service_builds_a_challenger_that_reads_the_champions_features(
    settings: Settings, challenger_model: Checkpoint, tmp_path: Path
) -> None:
    db = _db(tmp_path)
    ok = save_checkpoint(challenger_model, tmp_path / "challenger.pt")
    served = served_streams(load_streams(_stream_file(tmp_path, ok)).streams, db)
    (scorer,) = challenger_scorers(settings, served, db).values()
    assert scorer.model_version == challenger_model.version
    assert scorer.spec.feature_names == stream_scorers(settings, served)[served[0].stream.topic].spec.feature_names

    # the same channels in another order: the stream accepts it as a model, but not as this champion's challenger
    names = list(reversed(challenger_model.card["feature_names"]))
    reordered = save_checkpoint(
        replace(challenger_model, card={**challenger_model.card, "feature_names": names}), tmp_path / "reordered.pt"
    )
    served = served_streams(load_streams(_stream_file(tmp_path, reordered)).streams, db)
    with pytest.raises(ConfigError, match="stream 'sensors': challenger"):
        challenger_scorers(settings, served, db)
