"""KafkaSource on the real Tansu broker: a stopped (undecodable) partition stops making this member unready
once a rebalance takes it away, and log starts are looked up in one public ListOffsets request per
assignment, degrading to "unknown" with one WARNING when the lookup fails."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.app import Service
from pipeline.kafka.client import KafkaSource, ensure_topics, make_producer, produce_json
from pipeline.kafka.fast_fetch import UndecodableBatchError

TPs = Sequence[tuple[str, int]]


class Member:
    """A group member polling on its own thread (kafka-python runs the rebalance callbacks inside poll)."""

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topic: str,
        on_assigned: Callable[[KafkaSource, TPs], None] | None = None,
        outside_s: float = 0.0,
    ) -> None:
        """outside_s: time spent between polls while partitions are owned (as Processor.handle does with a
        batch). Not while none are (after a revocation): kafka-python 3.0.12 drops a JoinGroup answer that
        arrives between polls and sends a new one (coordinator/base.py join_group_async), so a member that
        stays outside poll() during its join may never join."""
        self.source = KafkaSource(bootstrap, group)
        self.outside_s, self.in_poll = outside_s, False
        self.callbacks_in_poll: list[bool] = []  # for each callback: was the polling thread inside poll()?
        self.assigned: list[tuple[str, int]] = []
        self.revoked: list[list[tuple[str, int]]] = []
        self.owned = False  # between an assignment and the next revocation
        self.errors: list[BaseException] = []
        self._stop = threading.Event()

        def assigned(tps: TPs) -> None:
            self.callbacks_in_poll.append(self.in_poll)
            self.assigned, self.owned = sorted(tps), bool(tps)
            if on_assigned is not None:
                on_assigned(self.source, tps)

        def revoked(tps: TPs) -> None:
            self.callbacks_in_poll.append(self.in_poll)
            self.revoked.append(sorted(tps))
            self.owned = False

        self.source.subscribe([topic], assigned, revoked)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.in_poll = True
                self.source.poll(100, 100)
                self.in_poll = False
                if self.owned:  # handle() only has work for partitions the processor owns
                    self._stop.wait(self.outside_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.source.close()


def _wait(cond: Callable[[], bool], timeout_s: float = 60.0, state: Callable[[], object] = lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {state()}"
        time.sleep(0.05)


def test_a_revoked_stopped_partition_no_longer_makes_the_member_unready(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic, group = f"{topic_prefix}stop", f"g{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [topic], 2)
    first = Member(kafka_bootstrap, group, topic)
    second: Member | None = None
    try:
        _wait(lambda: first.assigned == [(topic, 0), (topic, 1)])
        # what poll() does when partition 1's batch cannot be decompressed
        first.source._stop_undecodable(UndecodableBatchError(topic, 1, 0, "lz4 library missing"))  # noqa: SLF001 - what poll() does on an undecodable batch
        service = Service(SimpleNamespace(ready=threading.Event()), first.source, None, None, None)  # type: ignore[arg-type]
        service.processor.ready.set()
        assert (service.not_ready() or "").startswith("partitions stopped: topic ")
        second = Member(kafka_bootstrap, group, topic)
        _wait(lambda: bool(first.revoked) and bool(second.assigned) and len(first.assigned) == 1)
        assert any((topic, 1) in r for r in first.revoked), first.revoked
        assert (topic, 1) not in first.source.stopped
        assert service.not_ready() is None, service.not_ready()
        assert not first.errors and not second.errors
    finally:
        first.close()
        if second is not None:
            second.close()


class CountingLookups:
    """The consumer's own beginning_offsets, with each call's partitions recorded (or a failure injected)."""

    def __init__(self, consumer: Any, fail: BaseException | None = None) -> None:
        self.real, self.fail, self.calls = consumer.beginning_offsets, fail, []  # type: ignore[var-annotated]

    def __call__(self, partitions: Any, *args: Any, **kw: Any) -> Any:
        self.calls.append(sorted((p.topic, p.partition) for p in partitions))
        if self.fail is not None:
            raise self.fail
        return self.real(partitions, *args, **kw)


def test_log_starts_are_one_public_request_per_assignment(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic, group = f"{topic_prefix}lo", f"g{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [topic], 3)
    producer = make_producer(kafka_bootstrap)
    try:
        produce_json(producer, topic, [(f"k{i}", {"i": i}) for i in range(30)])
    finally:
        producer.close()
    seen: dict[tuple[str, int], int | None] = {}
    spy: list[CountingLookups] = []

    def on_assigned(source: KafkaSource, tps: TPs) -> None:
        if not spy:
            spy.append(CountingLookups(source.consumer))
            source.consumer.beginning_offsets = spy[0]
        for tp in tps:  # as Processor._on_assigned does, one partition at a time
            seen[tp] = source.log_start(tp)

    member = Member(kafka_bootstrap, group, topic, on_assigned)
    try:
        _wait(lambda: len(seen) == 3)
        assert seen == {(topic, p): 0 for p in range(3)}  # Tansu answers ListOffsets earliest correctly
        assert spy[0].calls == [[(topic, 0), (topic, 1), (topic, 2)]]
        # outside the assignment (a log reset found after a fetch): asked afresh, for that partition only
        assert member.source.log_start((topic, 2)) == 0
        assert spy[0].calls[1:] == [[(topic, 2)]]
        assert not member.errors
    finally:
        member.close()


def test_a_failed_log_start_lookup_is_unknown_with_one_warning(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A renamed client internal or a broker error must not escape the assignment callback."""
    caplog.set_level(logging.WARNING, logger="pipeline.kafka.client")
    topic, group = f"{topic_prefix}lofail", f"g{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [topic], 3)
    seen: dict[tuple[str, int], int | None] = {}
    done = threading.Event()

    def on_assigned(source: KafkaSource, tps: TPs) -> None:
        source.consumer.beginning_offsets = CountingLookups(source.consumer, AttributeError("renamed"))
        for tp in tps:
            seen[tp] = source.log_start(tp)
        done.set()

    member = Member(kafka_bootstrap, group, topic, on_assigned)
    try:
        _wait(done.is_set)
        assert seen == {(topic, p): None for p in range(3)}
        warnings = [r.getMessage() for r in caplog.records if "cannot read the log start" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert f"{topic}[0], {topic}[1], {topic}[2]" in warnings[0] and "renamed" in warnings[0]
        time.sleep(0.5)
        assert not member.errors and member.assigned == [(topic, p) for p in range(3)]
    finally:
        member.close()


def test_rebalance_callbacks_run_only_while_the_owner_is_inside_poll(kafka_bootstrap: str, topic_prefix: str) -> None:
    """The processor's revoke/assign callbacks (checkpoint, state drops) must not race with its batch
    handling: on kafka-python 2.3 they run inside poll() on the caller's thread; on 3.0 on a worker thread
    while poll() waits for the rebalance (pipeline.kafka.compat). The member spends 1 s outside poll() after
    each poll, as handle() does, while another member joins and forces a rebalance."""
    topic, group = f"{topic_prefix}cb", f"g{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [topic], 2)
    first = Member(kafka_bootstrap, group, topic, outside_s=1.0)
    second: Member | None = None
    try:
        _wait(lambda: len(first.assigned) == 2)
        second = Member(kafka_bootstrap, group, topic)
        _wait(
            lambda: bool(first.revoked) and len(first.assigned) == 1 and len(second.assigned) == 1,
            state=lambda: (
                first.assigned,
                first.revoked,
                first.callbacks_in_poll,
                second.assigned,
                first.errors,
                second.errors,
            ),
        )
        assert len(first.callbacks_in_poll) >= 3, first.callbacks_in_poll  # assign, revoke, assign
        assert all(first.callbacks_in_poll), first.callbacks_in_poll
        assert not first.errors and not second.errors
    finally:
        first.close()
        if second is not None:
            second.close()
