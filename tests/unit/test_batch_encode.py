"""The bench load generator's record-batch encoder writes what kafka-python's own parser reads back."""

from __future__ import annotations

import pytest
from kafka.consumer.fetcher import Fetcher
from kafka.record.memory_records import MemoryRecords
from kafka.structs import TopicPartition

from pipeline.bench.load import SensorLoad
from pipeline.kafka.batch_producer import encode_batch


@pytest.mark.parametrize("n", [1, 63, 64, 700, 5000])
def test_encoded_batch_parses_back(n: int) -> None:
    records = SensorLoad(300, seed=5).payloads(0, n)
    records[0] = (b"k" * 200, b"v" * 20000)  # multi-byte varints for the key, value and record lengths
    buf = encode_batch(records, 1_700_000_000_123)
    batch = MemoryRecords(buf).next_batch()
    assert batch.validate_crc()
    got = Fetcher.PartitionRecords(0, TopicPartition("t", 0), MemoryRecords(buf)).take()
    assert [(r.offset, r.key, r.value, r.timestamp, r.headers) for r in got] == [
        (i, k, v, 1_700_000_000_123, []) for i, (k, v) in enumerate(records)
    ]


def test_encoder_refuses_records_it_cannot_size() -> None:
    with pytest.raises(ValueError):
        encode_batch([(b"k", b"x" * 70000)], 0)
