"""Label feedback, aligned in event time (for transactions models that read `terminal_fraud_risk`).

A labels topic has the transactions topic's partition count and is assigned together with it (partition p of
both to one worker). Labels are queued in partition p's terminal context and applied once p's payments reach
the label's time. Payments wait until p's labels have been read past their time, so features do not depend
on which topic a poll returned first. Neither position passes a record not yet applied, and a labels
partition is snapshotted together with the transactions partition whose context holds its labels, so a
restart re-reads exactly the labels the restored context lacks."""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence

import numpy as np

from pipeline import metrics
from pipeline.features.streams import LabelStream, StreamIdentity, TransactionRecord, TransactionStream
from pipeline.processing.dead_letters import DeadLetters
from pipeline.processing.decode import decode, future_detail, future_horizon
from pipeline.processing.dedupe import Dedupe
from pipeline.processing.restore import PartitionRestore
from pipeline.processing.stats import ProcessorStats
from pipeline.records import RawRecord, Source, TopicPartition
from pipeline.state.partition import Partitions

log = logging.getLogger(__name__)


class LabelAlignment:
    def __init__(
        self,
        label_topics: Mapping[str, str],  # labels topic -> the transactions topic it feeds
        specs: Mapping[str, TransactionStream],  # transactions topic -> its stream
        *,
        source: Source,
        partitions: Partitions,
        restore: PartitionRestore,
        dead: DeadLetters,
        dedupe: Dedupe | None,
        stats: ProcessorStats,
        hold_cap: int,
        max_future_s: float,
    ) -> None:
        """hold_cap: payments held per partition before its fetching pauses (resumes below half of it);
        max_future_s: a label known later than this ahead of the wall clock is dead-lettered (from_the_future)."""
        for labels, fed in label_topics.items():
            spec = specs.get(fed)
            if spec is None or not spec.label_feedback:
                raise ValueError(
                    f"labels topic {labels!r} feeds {fed!r}, which is not a transactions stream "
                    "whose model reads label feedback"
                )
        self.label_topics = dict(label_topics)
        self.fed_by = {fed: labels for labels, fed in self.label_topics.items()}  # transactions -> labels topic
        self.specs = {fed: specs[fed] for fed in self.fed_by}
        self.source, self.partitions, self.restore = source, partitions, restore
        self.dead, self.dedupe, self.stats, self.hold_cap = dead, dedupe, stats, hold_cap
        self.max_future_s = max_future_s
        # a label names its entity by the field its payments use (a stream file may rename customer_id)
        self.label_specs = {
            labels: LabelStream(identity=StreamIdentity(entity_key=self.specs[fed].entity_key))
            for labels, fed in self.label_topics.items()
        }

    def snapshot_unit(self, tp: TopicPartition) -> set[TopicPartition]:
        """A transactions partition and its labels partition are only snapshotted together."""
        fed = self.label_topics.get(tp[0])
        if fed is not None:
            return {tp, (fed, tp[1])}
        labels = self.fed_by.get(tp[0])
        return {tp} if labels is None else {tp, (labels, tp[1])}

    def check_copartitioned(self, tps: Sequence[TopicPartition]) -> None:
        """Labels reach a payment's context only if this worker owns both partition p's: the range assignor
        (kafka-python's default) guarantees it when both topics have the same number of partitions."""
        have = set(tps)
        for labels, fed in self.label_topics.items():
            lone = sorted({p for t, p in have if t == labels} ^ {p for t, p in have if t == fed})
            if lone:
                log.error(
                    "partitions %s of %s / %s are not assigned together: labels of those partitions cannot "
                    "reach their payments (are the topics' partition counts equal, is the range assignor "
                    "in use?)",
                    lone,
                    fed,
                    labels,
                )

    def read(self, topic: str, recs: list[RawRecord]) -> None:
        """Decode labels (bad ones to the dead-letter topic) and queue them in their partition's context."""
        fed = self.label_topics[topic]
        spec, label_spec = self.specs[fed], self.label_specs[topic]
        queued: dict[int, tuple[list[int], list[str], list[float], list[float]]] = defaultdict(lambda: ([], [], [], []))
        horizon = future_horizon(self.max_future_s)
        for r in recs:
            st = self.partitions[(r.topic, r.partition)]
            st.label_read = r.offset + 1
            lab = decode(label_spec, r, self.dead)
            if lab is None:
                continue
            if lab.labelled_at > horizon:  # queued, it would hold back every label behind it until that time
                self.dead.send(r, "from_the_future", future_detail(lab.labelled_at, self.max_future_s))
                continue
            known = lab.labelled_at.timestamp()
            st.label_watermark = max(st.label_watermark, known)
            q = queued[r.partition]
            q[0].append(r.offset)
            q[1].append(lab.terminal_id)
            q[2].append(known)
            q[3].append(1.0 if lab.is_fraud else 0.0)
        for p, (offsets, terminals, known_at, fraud) in queued.items():
            ctx = self.restore.context(self.partitions[(fed, p)], spec)
            ctx.add_labels(offsets, terminals, np.asarray(known_at), np.asarray(fraud))
        self.stats.events += len(recs)
        metrics.EVENTS.labels(label_spec.name).inc(len(recs))

    def hold(
        self, topic: str, recs: list[RawRecord], good_recs: list[RawRecord], good: list[TransactionRecord]
    ) -> tuple[list[RawRecord], list[TransactionRecord]]:
        """Hold payments (in log order) whose labels may not have been read yet; return those ready now."""
        queues: dict[TopicPartition, deque[tuple[RawRecord, TransactionRecord]]] = {}
        for r in recs:
            tp = (r.topic, r.partition)
            if tp not in queues:
                st = self.partitions[tp]
                if st.held is None:
                    st.held = deque()
                queues[tp] = st.held
        for r, rec in zip(good_recs, good, strict=True):  # good_recs: those of recs that decoded
            queues[(r.topic, r.partition)].append((r, rec))
        return self.release(topic)

    def release(self, topic: str) -> tuple[list[RawRecord], list[TransactionRecord]]:
        labels = self.fed_by[topic]
        spec = self.specs[topic]
        out_recs: list[RawRecord] = []
        out: list[TransactionRecord] = []
        for st in self.partitions.of_topic(topic):
            queue = st.held
            if queue is None:
                continue
            # a payment is ready once every label known by its time has been read: the labels partition is
            # read to its end, or past a label known later (labels are written in labelled_at order, as a live
            # feed is; one written out of order is applied late, never early)
            ltp = (labels, st.tp[1])
            lst = self.partitions.get(ltp)
            if lst is None or self.source.caught_up(ltp):  # (not co-assigned: logged on assignment)
                ready = len(queue)
            else:
                mark = lst.label_watermark
                ready = 0
                while ready < len(queue) and queue[ready][1].timestamp.timestamp() <= mark:
                    ready += 1
            for _ in range(ready):
                r, rec = queue.popleft()
                if self.dedupe is not None and self.dedupe.duplicate(spec, r, rec):
                    continue
                out_recs.append(r)
                out.append(rec)
            st.advance(queue[0][0].offset if queue else st.next_offset)
            if len(queue) > self.hold_cap and not st.paused:  # bounded memory: stop fetching a partition that waits
                self.source.pause(st.tp)
                st.paused = True
            elif len(queue) <= self.hold_cap // 2 and st.paused:
                self.source.resume(st.tp)
                st.paused = False
        return out_recs, out

    def waiting(self) -> list[str]:
        """Transactions topics with payments held."""
        return [t for t in self.fed_by if any(st.held for st in self.partitions.of_topic(t))]

    @property
    def holding(self) -> int:
        """Payments read but waiting for their labels partition to catch up."""
        return sum(len(st.held) for st in self.partitions if st.held)

    def advance_label_positions(self) -> None:
        """A labels partition's position = its oldest label not applied yet (or past the last one read)."""
        for st in self.partitions:
            fed = self.label_topics.get(st.tp[0])
            if fed is None or st.label_read is None:
                continue
            tx = self.partitions.get((fed, st.tp[1]))
            first = tx.context.first_pending_offset if tx is not None and tx.context is not None else None
            st.advance(st.label_read if first is None else first)
