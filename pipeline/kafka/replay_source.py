"""A pipeline.records.Source over a *historical* range of topics, for replays and benchmarks.

- Manual `assign()`: no consumer group, so no JoinGroup delay and never a commit to the live group.
- The end of the range is each partition's high watermark captured at start (from a fetch response:
  `end_offsets()` is unreliable on some brokers, Tansu included); later records are never returned.
- Time bounds are applied client-side on each record's timestamp, half-open [from, to), so the range
  is exact whatever the broker answers to ListOffsets. `offsets_for_times()` is only used as a
  *hint* where to start, and only once the hint checks out against the records around it
  (seek_mode "auto"); "scan" always reads from the beginning.
- `commit()` sends nothing to Kafka: a replay's positions live in the database under its run id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from pipeline.errors import BrokerError
from pipeline.kafka.compat import NoBrokersAvailable
from pipeline.records import AssignCallback, RawRecord
from pipeline.records import TopicPartition as TP

log = logging.getLogger(__name__)
SeekMode = Literal["auto", "scan"]


def _consumer(bootstrap: str, client_id: str) -> KafkaConsumer:
    try:
        return KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            receive_message_max_bytes=64 * 1024 * 1024,
            reconnect_backoff_max_ms=2000,
        )
    except NoBrokersAvailable as exc:
        raise BrokerError(f"no broker at {bootstrap}") from exc


class ReplaySource:
    def __init__(
        self,
        bootstrap: str,
        *,
        from_ms: int | None = None,
        to_ms: int | None = None,
        seek_mode: SeekMode = "auto",
        client_id: str = "anomaly-replay",
        probe_timeout_s: float = 30.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.from_ms, self.to_ms = from_ms, to_ms
        self.seek_mode = seek_mode
        self.probe_timeout_s = probe_timeout_s
        self.consumer = _consumer(bootstrap, client_id)
        self.end: dict[TP, int] = {}  # exclusive end offset per partition, fixed at start
        self.start_hint: dict[TP, int] = {}  # no record before this offset is in [from, to)
        self.positions: dict[TP, int] = {}  # last commit() (the processor's durable position)
        self.out_of_range = 0  # records read but outside [from, to)

    # -- Source protocol ----------------------------------------------------------------------------
    def subscribe(self, topics: Sequence[str], on_assigned: AssignCallback, on_revoked: AssignCallback) -> None:
        tps: list[TP] = []
        for topic in topics:
            parts = self._partitions(topic)
            if not parts:
                raise BrokerError(f"topic {topic!r} does not exist on {self.bootstrap}")
            tps.extend((topic, p) for p in parts)
        self.consumer.assign([TopicPartition(t, p) for t, p in tps])
        self.end = self._highwaters(tps)
        self.start_hint = self._time_hints(tps) if self.from_ms is not None else {tp: 0 for tp in tps}
        on_assigned(tps)

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        out: list[RawRecord] = []
        lo = self.from_ms if self.from_ms is not None else -(2**63)
        hi = self.to_ms if self.to_ms is not None else 2**63
        for ktp, recs in batches.items():
            end = self.end.get((ktp.topic, ktp.partition), 0)
            n_before = len(out)
            for r in recs:
                if r.offset >= end:
                    break
                if lo <= r.timestamp < hi:
                    out.append(RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp))
            self.out_of_range += sum(1 for r in recs if r.offset < end) - (len(out) - n_before)
        self._pause_finished()
        return out

    def seek(self, tp: TP, offset: int) -> None:
        start = max(offset, self.start_hint.get(tp, 0))
        ktp = TopicPartition(*tp)
        self.consumer.seek(ktp, start)
        if start < self.end.get(tp, 0):
            self.consumer.resume(ktp)
        else:
            self.consumer.pause(ktp)

    def committed(self, tp: TP) -> int | None:
        return None  # a replay never reads or writes the live group's offsets

    def caught_up(self, tp: TP) -> bool:
        return int(self.consumer.position(TopicPartition(*tp))) >= self.end.get(tp, 0)  # the range's end

    def pause(self, tp: TP) -> None:
        self.consumer.pause(TopicPartition(*tp))

    def resume(self, tp: TP) -> None:
        ktp = TopicPartition(*tp)
        if int(self.consumer.position(ktp)) < self.end.get(tp, 0):  # finished partitions stay paused
            self.consumer.resume(ktp)

    def commit(self, offsets: Mapping[TP, int]) -> None:
        self.positions.update(offsets)

    def lag(self) -> int | None:
        total = 0
        for ktp in self.consumer.assignment():
            end = self.end.get((ktp.topic, ktp.partition), 0)
            total += max(0, end - int(self.consumer.position(ktp)))
        return total

    def total(self) -> int:
        """Records in the range's offsets (before time filtering)."""
        return sum(max(0, e - self.start_hint.get(tp, 0)) for tp, e in self.end.items())

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except KafkaError as exc:  # pragma: no cover - best effort
            log.warning("replay consumer close: %s", exc)

    # -- internals -----------------------------------------------------------------------------------
    def _partitions(self, topic: str) -> list[int]:
        """The topic's partitions; [] once two fresh cluster-wide metadata reads in a row lack the topic (a
        missing topic was waited on for the whole probe timeout, 30 s), or at the timeout."""
        deadline = time.monotonic() + self.probe_timeout_s
        absent = 0
        while True:
            parts = self.consumer.partitions_for_topic(topic)
            if parts or time.monotonic() > deadline:
                return sorted(parts or [])
            absent = absent + 1 if topic not in self.consumer.topics() else 0  # topics(): a fresh metadata read
            if absent >= 2:
                return []
            time.sleep(0.2)

    def _pause_finished(self) -> None:
        done = [
            ktp
            for ktp in self.consumer.assignment()
            if ktp not in self.consumer.paused()
            and int(self.consumer.position(ktp)) >= self.end.get((ktp.topic, ktp.partition), 0)
        ]
        if done:
            self.consumer.pause(*done)

    def _highwaters(self, tps: Sequence[TP]) -> dict[TP, int]:
        """Each partition's high watermark, from real fetch responses (not ListOffsets)."""
        ktps = [TopicPartition(*tp) for tp in tps]
        for ktp in ktps:
            self.consumer.seek(ktp, 0)
        deadline = time.monotonic() + self.probe_timeout_s
        while True:
            hws = {tp: self.consumer.highwater(k) for tp, k in zip(tps, ktps, strict=True)}
            if all(v is not None for v in hws.values()):
                return {tp: int(v) for tp, v in hws.items() if v is not None}
            if time.monotonic() > deadline:
                missing = [tp for tp, v in hws.items() if v is None]
                raise BrokerError(f"no fetch response (high watermark) for {missing} within {self.probe_timeout_s}s")
            self.consumer.poll(timeout_ms=100, max_records=1)  # records are discarded: we seek before reading

    def _time_hints(self, tps: Sequence[TP]) -> dict[TP, int]:
        """Where to start reading for `from`: a verified offsets_for_times answer, else 0 (scan)."""
        hints = {tp: 0 for tp in tps}
        if self.seek_mode == "scan" or self.from_ms is None:
            return hints
        try:
            answer = self.consumer.offsets_for_times({TopicPartition(*tp): self.from_ms for tp in tps})
        except (KafkaError, ValueError) as exc:
            log.info("offsets_for_times failed (%s): scanning from the beginning", exc)
            return hints
        for tp in tps:
            found = answer.get(TopicPartition(*tp))
            end = self.end.get(tp, 0)
            hint = end if found is None else int(found.offset)
            if 0 < hint <= end and self._verify_hint(tp, hint):
                hints[tp] = hint
            elif hint != 0:
                log.info(
                    "offsets_for_times hint %s for %s[%d] does not match the records' timestamps: "
                    "scanning the partition from the beginning",
                    hint,
                    tp[0],
                    tp[1],
                )
        return hints

    def _verify_hint(self, tp: TP, hint: int) -> bool:
        """The record before the hint must be older than `from`, the record at it (if any) not older."""
        before = self._read_one(tp, hint - 1)
        if before is None or before.timestamp >= (self.from_ms or 0):
            return False
        if hint < self.end.get(tp, 0):
            at = self._read_one(tp, hint)
            return at is not None and at.timestamp >= (self.from_ms or 0)
        return True

    def _read_one(self, tp: TP, offset: int) -> Any:
        probe = _consumer(self.bootstrap, "anomaly-replay-probe")
        try:
            ktp = TopicPartition(*tp)
            probe.assign([ktp])
            probe.seek(ktp, offset)
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                for r in probe.poll(timeout_ms=200, max_records=1).get(ktp, []):
                    return r if r.offset == offset else None
            return None
        finally:
            probe.close()
