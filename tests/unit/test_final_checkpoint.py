"""How a run ends is reported (found by probing, 2026-12-01): a run that cannot write its final checkpoint
(database down at shutdown) exited 0, which a supervisor could not tell from a clean stop; an idle exit without
a partition printed "0 events" alone. In-memory Source, real SQLite store, the bundled sensors model."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.app import build_scorers, ensure_models
from pipeline.config import Settings
from pipeline.errors import SinkError
from pipeline.processor import Processor, ProcessorOptions
from pipeline.records import RawRecord
from pipeline.simulate import simulate_sensors, strip_labels
from tests.sql_helpers import SqlTestStore
from tests.unit.test_label_alignment import ListDeadLetters, MemoryLog


class DatabaseDown(SqlTestStore):
    def write_checkpoint(self, *args: Any, **kwargs: Any) -> int:
        raise SinkError("connection refused\n[SQL: INSERT INTO alerts ...]\n[parameters: {'entity_id': 'C1'}]")


def test_a_run_without_its_final_checkpoint_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(device="cpu", sensors_topic="s")
    scorers = build_scorers(settings, {"sensors": ensure_models(settings)["sensors"]})
    recs = strip_labels(simulate_sensors(2, 5, seed=1)[0])
    raws = [RawRecord("s", 0, i, r["device_id"].encode(), orjson.dumps(r), 0) for i, r in enumerate(recs)]
    monkeypatch.setattr("pipeline.processor.time.sleep", lambda _s: None)  # the final checkpoint's backoff
    for store, durable in ((SqlTestStore, True), (DatabaseDown, False)):
        db = store(f"sqlite:///{tmp_path / store.__name__}.db")
        db.create_schema()
        opts = ProcessorOptions(max_batch_records=100, commit_interval_ms=10**9)
        proc = Processor(MemoryLog({("s", 0): len(raws)}, [list(raws)]), db, ListDeadLetters(), scorers, opts)
        stats = proc.run(threading.Event(), max_events=len(raws))
        assert stats.scored == len(raws) and stats.final_checkpoint is durable
        db.dispose()
    # each failure is one line (it logged the statement and its parameters, six lines every retry)
    failed = [r.getMessage() for r in caplog.records if "final checkpoint failed" in r.getMessage()]
    assert failed and all(m.endswith(": connection refused") for m in failed)


def test_an_idle_exit_without_a_partition_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With another member of the group holding every partition, `run --idle-exit` printed "0 events" and
    exited 0, which reads as "nothing to do" (found by probing, 2026-12-01)."""
    settings = Settings(device="cpu", sensors_topic="s", group_id="shared")
    scorers = build_scorers(settings, {"sensors": ensure_models(settings)["sensors"]})
    db = SqlTestStore(f"sqlite:///{tmp_path / 'a.db'}")
    db.create_schema()
    opts = ProcessorOptions(group_id="shared")
    proc = Processor(MemoryLog({}, []), db, ListDeadLetters(), scorers, opts)
    with caplog.at_level("WARNING", logger="pipeline.processor"):
        stats = proc.run(threading.Event(), idle_exit_s=0.0)
    db.dispose()
    assert stats.events == 0
    assert "idle exit without a partition: another member of consumer group 'shared' holds them all" in caplog.text


def test_the_live_entities_gauge_follows_the_store_between_evictions(tmp_path: Path) -> None:
    """A probe: pipeline_live_entities was set only right after an eviction, so it always showed the low point
    (exactly the cap) while the store held 2.3x as many entities between two housekeepings."""
    from prometheus_client import REGISTRY

    settings = Settings(device="cpu", sensors_topic="s")
    scorers = build_scorers(settings, {"sensors": ensure_models(settings)["sensors"]})
    recs = strip_labels(simulate_sensors(7, 3, seed=1)[0])
    raws = [RawRecord("s", 0, i, r["device_id"].encode(), orjson.dumps(r), 0) for i, r in enumerate(recs)]
    db = SqlTestStore(f"sqlite:///{tmp_path / 'g.db'}")
    db.create_schema()
    opts = ProcessorOptions(max_batch_records=100, commit_interval_ms=0, snapshot_interval_s=3600.0)
    proc = Processor(MemoryLog({("s", 0): len(raws)}, [list(raws)]), db, ListDeadLetters(), scorers, opts)
    proc.run(threading.Event(), max_events=len(raws))  # no housekeeping (eviction) within the hour
    db.dispose()
    assert REGISTRY.get_sample_value("pipeline_live_entities", {"stream": "sensors"}) == 7
