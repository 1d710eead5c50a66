"""One PartitionState per owned partition: revoking deletes everything of it, positions only move forwards
unless rewound, and the facts the processor and the incident lifecycle share are written once."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import numpy as np

from pipeline.alerts.lifecycle import _ROW_NAMES, Incident, IncidentTracker, LifecyclePolicy, ScoredEvent
from pipeline.app import options_from
from pipeline.checkpointing.rows import IncidentRow
from pipeline.config import Settings
from pipeline.features.streams import TransactionStream
from pipeline.processing.alerts import build_alerts
from pipeline.processor import ProcessorOptions
from pipeline.records import RawRecord
from pipeline.scoring.scorer import ScoreBatch
from pipeline.state.partition import Partitions, RecentIds

TP = ("tx", 0)


def test_revoking_a_partition_drops_all_of_its_state() -> None:
    parts = Partitions()
    st = parts.assign(TP)
    st.context = TransactionStream(terminal_context=True).new_context()
    st.dedupe = RecentIds(3)
    st.committed, st.label_read = 10, 4
    parts.assign(("tx", 1))
    parts.revoke(TP)
    assert TP not in parts and [s.tp for s in parts] == [("tx", 1)]
    assert parts.committed == {} and parts.replay_floor(TP) == 0 and parts.tag(TP) == ""
    assert parts[TP].context is None  # a partition seen again starts from its checkpoint, not from memory


def test_positions_move_forwards_unless_rewound() -> None:
    st = Partitions().assign(TP)
    st.committed = 100
    st.advance(80)
    assert st.replaying and st.durable_after(80) == 100
    st.advance(50)
    assert st.consumed == 80
    st.rewind(0)
    assert (st.consumed, st.committed, st.next_offset, st.recovery_until) == (0, 0, 0, 0)
    assert st.rewound and st.snapshot is None and st.tag == "~1" and st.durable_after(5) == 5
    st.jump(40)
    assert st.consumed == 40 and st.next_offset == 40 and st.held is None


def test_incident_is_derived_from_its_row() -> None:
    names = {f.name for f in fields(Incident)}
    assert {_ROW_NAMES.get(f.name, f.name) for f in fields(IncidentRow)} <= names
    t = IncidentTracker("live", LifecyclePolicy())
    t.apply(ScoredEvent("transactions", "C1", "tx", 0, 1, 1000.0, 9.0, 2.0), True)
    inc = t.open[("transactions", "C1")]
    row = inc.to_row()
    assert row.incident_key == inc.key and row.opened_at.timestamp() == 1000.0 and row.resolved_at is None
    assert Incident.from_row(row.__dict__) == inc.__class__(
        **{**inc.__dict__, "last_trigger": None, "last_trigger_offset": -1}
    )


def test_processor_options_come_from_settings() -> None:
    s = Settings(max_batch_records=123, dedupe_window=7, run_id="r")
    opt = options_from(s)
    assert (opt.max_batch_records, opt.dedupe_window, opt.run_id) == (123, 7, "r")
    default = ProcessorOptions()
    assert (default.max_batch_records, default.snapshot_interval_s) == (
        Settings().max_batch_records,
        Settings().snapshot_interval_s,
    )
    assert opt.severity_bands == LifecyclePolicy().severity_bands


def test_an_alert_and_its_incident_agree_on_severity() -> None:
    bands = (2.0, 4.0, 8.0)  # score/threshold 3 is "medium" here, "high" under the default bands
    spec = TransactionStream()
    n, f = 1, spec.n_features
    res = ScoreBatch(
        np.arange(n), ["C1"], np.array([3.0]), np.ones(n), np.ones(n, bool), *(np.ones((n, f)),) * 3, np.ones(n)
    )
    scorer = SimpleNamespace(spec=spec, model_version="m")
    recs = [RawRecord("tx", 0, 1, b"C1", b"", 0)]
    (alert,) = build_alerts("live", scorer, recs, np.array([1000.0]), res, bands=bands)  # type: ignore[arg-type]
    t = IncidentTracker("live", LifecyclePolicy(severity_bands=bands))
    t.apply(ScoredEvent("transactions", "C1", "tx", 0, 1, 1000.0, 3.0, 1.0), True)
    assert alert.severity == t.open[("transactions", "C1")].severity == "medium"
