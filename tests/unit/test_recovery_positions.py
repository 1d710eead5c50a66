"""Positions never move backwards during a replay (issue 11, fault 3): the Checkpointer on a real SQLite
store. After a restart a partition replays from its snapshot (consumed < committed); checkpoints taken
meanwhile must not write the replay position, must not snapshot state that is behind the durable position,
and must not write the replay's re-emitted alerts again. Only an explicit rewind (offset reset) goes lower."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone

from pipeline.checkpointing import Checkpointer
from pipeline.checkpointing.rows import AlertRow, StateRow
from pipeline.records import RawRecord, TopicPartition
from pipeline.state.partition import Partitions, PartitionState
from tests.sql_helpers import SqlTestStore

TP = ("tx", 0)


class Commits:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


class NoDeadLetters:
    def send(self, record: RawRecord, reason: str, detail: str) -> None:
        raise AssertionError("no dead letters here")

    def flush(self) -> None:
        pass


def _alert(offset: int, tag: str = "") -> AlertRow:
    return AlertRow(
        alert_key=f"r|tx|0|{offset}|m{tag}",
        run_id="r",
        stream="transactions",
        entity_id="C1",
        event_time=datetime(2024, 1, 1, tzinfo=timezone.utc),
        score=9.0,
        threshold=1.0,
        severity="high",
        model_version="m",
        top_features=[],
        source_topic="tx",
        source_partition=0,
        source_offset=offset,
    )


def _make(store: SqlTestStore) -> tuple[Checkpointer, PartitionState, Commits, list[set[TopicPartition]]]:
    source = Commits()
    snapped: list[set[TopicPartition]] = []

    def collect(tps: set[TopicPartition]) -> tuple[list[StateRow], object]:
        snapped.append(set(tps))
        return [StateRow("transactions", "C1", "tx", 0, b"x")] if tps else [], lambda: None

    parts = Partitions()
    ck = Checkpointer(
        store,
        source,  # type: ignore[arg-type]
        NoDeadLetters(),
        parts,
        run_id="r",
        group_id="g",
        collect_states=collect,  # type: ignore[arg-type]
    )
    return ck, parts.assign(TP), source, snapped


def test_replay_checkpoints_never_move_positions_backwards(sqlite_store: SqlTestStore) -> None:
    ck, st, source, snapped = _make(sqlite_store)
    st.committed, st.snapshot = 100, 60  # as on_assigned restores them after a kill -9
    st.advance(80)  # replaying 60..99
    assert st.replaying
    ck.add([_alert(70), _alert(90)])  # re-emitted by the replay: already durable
    ck.checkpoint(snapshot={TP})
    assert sqlite_store.load_offsets("r", "g").get(TP, (100, 60))[0] >= 100
    assert all(c[TP] >= 100 for c in source.commits), source.commits
    assert snapped == [], "snapshot taken of state that is behind the durable position"
    assert sqlite_store.count_alerts("r") == 0, "replayed alerts written again"
    assert st.committed == 100
    st.advance(130)  # past the durable position: normal again
    ck.add([_alert(110)])
    ck.checkpoint(snapshot={TP})
    assert sqlite_store.load_offsets("r", "g")[TP] == (130, 130)
    assert snapped == [{TP}] and sqlite_store.count_alerts("r") == 1
    assert [c[TP] for c in source.commits] == sorted(c[TP] for c in source.commits)


def test_rewind_writes_the_lower_position_with_a_snapshot(sqlite_store: SqlTestStore) -> None:
    ck, st, source, snapped = _make(sqlite_store)
    st.advance(700)
    ck.checkpoint(snapshot={TP})
    assert sqlite_store.load_offsets("r", "g")[TP] == (700, 700)
    st.rewind(0)  # the broker's log restarted at 0 (offset reset policy earliest)
    ck.checkpoint(snapshot=set())
    assert sqlite_store.load_offsets("r", "g")[TP] == (0, 0)
    assert snapped[-1] == {TP} and source.commits[-1][TP] == 0
    assert sqlite_store.load_epochs("r", "g") == {TP: 1}
    ck.add([_alert(5, st.tag)])  # a new record at a low offset is not mistaken for a replay
    st.advance(10)
    ck.checkpoint(snapshot=set())
    assert sqlite_store.load_offsets("r", "g")[TP][0] == 10
    # the new log's alert carries the epoch suffix (given by build_alerts, see test_review_fixes.py)
    assert [a["alert_key"] for a in sqlite_store.list_alerts(run_id="r")] == ["r|tx|0|5|m~1"]
