"""Per-record cost of kafka-python's record parser vs pipeline.kafka.fast_fetch on one 1,000-record batch
(docs/results/bench.md, "kafka-python 2.3 vs 3.0"). Run with each kafka-python: `python docs/results/parse_bench.py`."""

import time

import kafka
from kafka.consumer.fetcher import Fetcher
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
from kafka.structs import TopicPartition

from pipeline.kafka.fast_fetch import FastPartitionRecords, self_test
from pipeline.records import RawRecord

VALUE = b'{"device_id":"pump-0001","timestamp":"2020-03-09T10:00:00Z","values":{"a":1.0,"b":2.0,"c":3.0,"d":4.0}}'
assert self_test() is None, self_test()
builder = MemoryRecordsBuilder(2, 0, 10**8, offset=0)
for i in range(1000):
    builder.append(1_700_000_000_000 + i, b"pump-%04d" % (i % 500), VALUE, [])
builder.close()
buf = bytes(builder.buffer())
tp = TopicPartition("t", 0)


def stock() -> list[RawRecord]:
    part = Fetcher.PartitionRecords(0, tp, MemoryRecords(buf))
    return [RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in part.take()]


def fast() -> list[RawRecord]:
    return list(FastPartitionRecords(0, tp, MemoryRecords(buf)).take())


assert stock() == fast()
for name, f in (("stock", stock), ("fast", fast)):
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(20):
            f()
        times.append(time.perf_counter() - t0)
    print(f"kafka-python {kafka.__version__} {name}: {min(times) / 20 / 1000 * 1e6:.2f} us per record")
