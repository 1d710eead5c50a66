"""Follow a topic from outside any consumer group (`pipeline alerts tail`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from pipeline.errors import BrokerError
from pipeline.kafka.compat import NoBrokersAvailable, bootstrap_timeout


def follow(
    bootstrap: str, topic: str, *, from_beginning: bool = False, idle_timeout_s: float | None = None, poll_ms: int = 500
) -> Iterator[tuple[str | None, bytes]]:
    """Yield (key, value) of new messages on every partition of `topic`, forever or until no message came
    for idle_timeout_s. No group: nothing is committed, every tail sees everything."""
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            group_id=None,
            reconnect_backoff_max_ms=2000,
            **bootstrap_timeout(10_000),  # a person is waiting at the terminal
        )
    except NoBrokersAvailable as exc:
        raise BrokerError(f"no broker at {bootstrap}") from exc
    try:
        deadline = time.monotonic() + 15
        parts = consumer.partitions_for_topic(topic)
        while not parts:
            if time.monotonic() > deadline:
                raise BrokerError(f"topic {topic!r} not found on {bootstrap}")
            time.sleep(0.3)
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        started_ms = time.time() * 1000
        if from_beginning:
            consumer.seek_to_beginning(*tps)
        else:
            consumer.seek_to_end(*tps)
        # Some brokers (Tansu, the embedded one) answer "latest offset" with the start of the last batch, not
        # the log end, so the first fetch can return messages from before the tail began. The first fetch's
        # high watermark is the real end: a record below it that was also written before the start is old.
        old_below: dict[TopicPartition, int] = {}
        last = time.monotonic()
        while True:
            batches = consumer.poll(timeout_ms=poll_ms)
            got = False
            for ktp, recs in batches.items():
                if not from_beginning and ktp not in old_below:
                    old_below[ktp] = consumer.highwater(ktp) or 0
                for r in recs:
                    if r.offset < old_below.get(ktp, 0) and r.timestamp < started_ms:
                        continue
                    got = True
                    yield (r.key.decode("utf-8", "replace") if r.key is not None else None), r.value or b""
            if got:
                last = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - last >= idle_timeout_s:
                return
    except KafkaError as exc:
        raise BrokerError(f"tail {topic}: {exc}") from exc
    finally:
        consumer.close(autocommit=False)
