"""The bench's BatchProducer against the real broker: records arrive in order, on the partitions
kafka-python's KafkaProducer would have chosen for their keys, stamped with the send time."""

from __future__ import annotations

import time

from pipeline.bench.load import SensorLoad
from pipeline.kafka.batch_producer import BatchProducer
from pipeline.kafka.client import ensure_topics, make_producer, read_topic


def test_batch_producer_matches_kafka_producer(kafka_bootstrap: str, topic_prefix: str) -> None:
    ours, theirs = f"{topic_prefix}-batch", f"{topic_prefix}-kp"
    ensure_topics(kafka_bootstrap, [ours, theirs], 4)
    records = SensorLoad(40, seed=2).payloads(0, 600)
    before = int(time.time() * 1000)
    producer = BatchProducer(kafka_bootstrap, ours)
    try:
        producer.send(records[:250])
        producer.send(records[250:])
    finally:
        producer.close()
    after = int(time.time() * 1000)
    kp = make_producer(kafka_bootstrap)
    for k, v in records:
        kp.send(theirs, key=k, value=v)
    kp.flush()
    kp.close()

    got = read_topic(kafka_bootstrap, ours)
    ref = read_topic(kafka_bootstrap, theirs)
    assert len(got) == len(records)
    assert {r.key: r.partition for r in got} == {r.key: r.partition for r in ref}
    for p in range(4):  # per partition: the records of its keys, in send order, offsets from 0
        mine = [(r.offset, r.key, r.value) for r in got if r.partition == p]
        want = [(k, v) for k, v in records if k in {r.key for r in ref if r.partition == p}]
        assert [(k, v) for _, k, v in mine] == want
        assert [o for o, _, _ in mine] == list(range(len(want)))
    assert all(before <= r.timestamp_ms <= after for r in got)
