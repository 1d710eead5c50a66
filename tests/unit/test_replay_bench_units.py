"""Pure parts of replay and bench: time parsing, model lookup, latency attribution, soak trend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.bench.core import TimedSource, soak_summary
from pipeline.bench.load import SensorLoad
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.features.streams import make_stream
from pipeline.records import RawRecord
from pipeline.replay.core import default_run_id, parse_range, parse_time, resolve_model
from pipeline.simulate import SENSOR_CHANNELS
from schemas.fast import SensorReadingFast
from schemas.types import SensorReading


def test_parse_time_accepts_iso_and_epoch_ms() -> None:
    assert parse_time("2020-03-09T10:14:33Z") == 1583748873000
    assert parse_time("2020-03-09T10:14:33") == 1583748873000  # naive = UTC
    assert parse_time("2020-03-09T11:14:33+01:00") == 1583748873000
    assert parse_time("1583748873000") == 1583748873000
    with pytest.raises(ConfigError):
        parse_time("yesterday")
    assert default_run_id().startswith("replay-")


def test_a_time_range_is_checked_once_for_replay_and_train() -> None:
    assert parse_range("2020-03-09T10:14:33Z", None) == (1583748873000, None)
    assert parse_range(None, "1583748873000") == (None, 1583748873000)
    for a, b in (("2024-02-01", "2024-01-01"), ("2024-01-01", "2024-01-01")):
        with pytest.raises(ConfigError, match="--to must be after --from"):
            parse_range(a, b)


def test_resolve_model_by_version_and_path() -> None:
    s = Settings()
    s.models_dir = None
    by_path = resolve_model("models/checkpoints/sensors.pt", s)
    assert resolve_model(by_path.version, s).version == by_path.version
    with pytest.raises(ConfigError, match="no model version"):
        resolve_model("nope@0", s)


class _Inner:
    def __init__(self, batches: list[list[RawRecord]]) -> None:
        self.batches = batches

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: dict) -> None:
        pass


def test_latency_is_commit_time_minus_record_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.bench.core as core

    recs = [RawRecord("t", 0, i, None, b"", 1000 * i) for i in range(4)]
    src = TimedSource(_Inner([recs[:2], recs[2:]]))
    src.poll(0, 10)
    monkeypatch.setattr(core.time, "time", lambda: 5.0)
    src.commit({("t", 0): 2})  # offsets 0, 1 durable at t=5 s
    src.poll(0, 10)
    monkeypatch.setattr(core.time, "time", lambda: 9.0)
    src.commit({("t", 0): 4})
    monkeypatch.undo()
    assert np.flatnonzero(src.hist).tolist() == [4000, 5000, 6000, 7000]
    assert src.latency_pcts()["max"] == 7000 and src.latency_pcts()["n"] == 4
    assert src.last_commit_covering(4) == 9.0
    assert src.pending[("t", 0)] == []


def test_soak_summary_flat_vs_growing() -> None:
    flat = [(float(i), 100.0 + (i % 2) * 0.1, i * 1000) for i in range(50)]
    grow = [(float(i), 100.0 + i, i * 1000) for i in range(50)]
    assert abs(soak_summary(flat)["mb_per_million_events"]) < 1
    assert soak_summary(grow)["mb_per_million_events"] == pytest.approx(1000, rel=1e-6)


def test_bench_load_is_valid_wire_json() -> None:
    spec = make_stream("sensors", channels=SENSOR_CHANNELS)
    load = SensorLoad(50, seed=3)
    decoded = [spec.decode(v) for _, v in load.payloads(0, 200)]
    recs = [r for r in decoded if isinstance(r, SensorReading | SensorReadingFast)]
    assert len(recs) == len(decoded), "every bench payload decodes as a sensor reading"
    dev, ts, vals = SensorLoad(50, seed=3).arrays(0, 200)  # same seed, same events
    assert [r.device_id for r in recs] == [load.ids[d] for d in dev]
    np.testing.assert_allclose([r.timestamp.timestamp() for r in recs], ts, atol=1e-6)
    np.testing.assert_allclose([[r.values[c] for c in SENSOR_CHANNELS] for r in recs], vals, atol=1e-5)


def test_scorer_bench_reports_batch_fill_of_the_model_calls() -> None:
    from pipeline.bench.core import bench_scorer

    res = bench_scorer(Settings(), SensorLoad(300, seed=1), device="cpu", batch=1536, seconds=0.2)
    assert res["model_chunk"] == 1024
    assert res["batch_fill"] == pytest.approx(1536 / 2048)  # 1536 windows = one full + one half chunk
    assert res["windows_per_s"] > 0 and 0 < res["model_share_of_time"] <= 1


def test_replay_refuses_a_model_of_another_stream_than_the_one_it_scores() -> None:
    """A probe: `replay --stream transactions --model <a sensors version>` scored with the transactions
    champion (the candidate silently replaced the sensors model, unused), and without --stream the card's
    stream beat the configured topic's: every payment dead-lettered, exit 0. Both are refused now."""
    from models.lstm_ae import bundled_checkpoint_path
    from pipeline.replay.core import scorers_for

    s = Settings(transactions_topic="tx", sensors_topic="sn")
    sensors = str(bundled_checkpoint_path("sensors"))
    with pytest.raises(ConfigError, match="is a sensors model; --stream says transactions"):
        scorers_for(s, ["archive"], "transactions", sensors)
    with pytest.raises(ConfigError, match=r"is a sensors model; topic 'tx' is the transactions topic"):
        scorers_for(s, ["tx"], None, sensors)
    served = scorers_for(s, ["archive", "sn"], None, sensors)  # an unconfigured topic takes the card's stream
    assert {t: sc.spec.name for t, sc in served.items()} == {"archive": "sensors", "sn": "sensors"}


def test_replay_names_what_is_wrong_with_its_stream_and_model_options(tmp_path: Path) -> None:
    """Without a stream file --stream is a bundled stream's name; with one (PIPELINE_STREAMS_FILE) it is a declared
    stream's, a topic no stream declares needs it, and --model takes what a stream file's `model` takes."""
    from pipeline.replay.core import scorers_for
    from pipeline.sinks import Database

    with pytest.raises(ConfigError, match="without a stream file"):
        scorers_for(Settings(), ["archive"], "pumps", None)
    s = Settings()
    s.streams_file = Path(__file__).resolve().parents[2] / "pipeline" / "streams" / "default.toml"
    db = Database(f"sqlite:///{tmp_path}/replay.db")
    db.create_schema()
    try:
        with pytest.raises(ConfigError, match=r"'pumps' is not declared .*\(have: transactions, sensors\)"):
            scorers_for(s, ["archive"], "pumps", None, db)
        with pytest.raises(ConfigError, match="topic 'archive' is not a declared stream's topic"):
            scorers_for(s, ["archive"], None, None, db)
        with pytest.raises(ConfigError, match="--model must be NAME@ALIAS"):
            scorers_for(s, ["archive"], "sensors", "not a model", db)
        with pytest.raises(ConfigError, match="no version|registry|pumps"):
            scorers_for(s, ["archive"], "sensors", "pumps@champion", db)
        served = scorers_for(s, ["archive"], "sensors", None, db)
        assert served["archive"].spec.name == "sensors"
    finally:
        db.dispose()


def test_replay_refuses_a_candidate_version_of_another_stream(tmp_path: Path) -> None:
    """`replay --topic plant.pumps --model chillers-v2` scored the pumps with the chillers' model whenever the
    channels fitted, a candidate `models promote` would refuse for pumps. Refused before anything is read."""
    from pipeline.replay.core import declared_scorers
    from pipeline.sinks import Database

    streams = tmp_path / "plant.toml"
    channels = '[[streams.channels]]\nname = "flow"\n'
    streams.write_text(
        '[[streams]]\nname = "pumps"\ntopic = "plant.pumps"\nkind = "sensors"\nentity_key = "pump_id"\n'
        f'time_field = "at"\nmodel = "pumps@champion"\n{channels}'
        '[[streams]]\nname = "line2"\ntopic = "plant.line2"\nkind = "sensors"\nentity_key = "pump_id"\n'
        f'time_field = "at"\nmodel = "pumps@champion"\n{channels}'
    )
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    try:
        for topic in ("plant.pumps", "plant.line2"):  # line2 serves the pumps' models: the same rule
            with pytest.raises(ConfigError, match="is a version of 'chillers', and stream '.*' serves 'pumps'"):
                declared_scorers(Settings(), streams, [topic], None, "chillers-v2", db)
            with pytest.raises(ConfigError, match="is a version of 'chillers'"):
                declared_scorers(Settings(), streams, [topic], None, "chillers@challenger", db)
        # a version of the stream's own models goes on to the registry (which has none here)
        with pytest.raises(ConfigError, match="pumps-v9"):
            declared_scorers(Settings(), streams, ["plant.pumps"], None, "pumps-v9", db)
    finally:
        db.dispose()


def test_bench_memory_counts_the_state_arrays_below_the_preallocated_capacity() -> None:
    """A probe: `bench --entities 300` printed 35 B per live entity next to 1,230 B of state arrays per slot:
    the slots allocated before tracing started were not counted."""
    from pipeline.bench.core import bench_memory

    small, large = bench_memory(Settings(), 300), bench_memory(Settings(), 5000)
    assert small["bytes_per_entity"] >= small["array_bytes_per_slot"]
    assert large["bytes_per_entity"] >= large["array_bytes_per_slot"] * 0.9, large
