"""Names that differ between the kafka-python lines this package supports (2.3.x and 3.0.x; pyproject.toml)."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from typing import Any

from kafka import KafkaConsumer

try:  # 2.3: raised by a client that cannot reach any bootstrap server
    from kafka.errors import NoBrokersAvailable
except ImportError:  # 3.0: the same failure is a KafkaTimeoutError("Unable to bootstrap from ...")
    from kafka.errors import KafkaTimeoutError as NoBrokersAvailable  # type: ignore[assignment]

try:  # 2.3: versioned request classes, tuples in and out
    from kafka.protocol.produce import ProduceRequest

    NEW_PROTOCOL = False
except ImportError:  # 3.0: generated messages with named fields; the client picks the version
    from kafka.protocol.producer import ProduceRequest  # type: ignore[no-redef]

    NEW_PROTOCOL = True

try:  # 2.3: the network client under the consumer/producer
    from kafka import KafkaClient
except ImportError:  # 3.0: its drop-in replacement
    from kafka.net.compat import KafkaNetClient as KafkaClient  # type: ignore[no-redef]


try:  # 3.0: rebalance listeners run on the client's IO thread
    from kafka import AsyncConsumerRebalanceListener
    from kafka.net.selector import KernelEvent
except ImportError:  # 2.3: they run inside poll(), on the caller's thread
    AsyncConsumerRebalanceListener = None
    KernelEvent = None

_InWorker: Any = None


def bootstrap_timeout(ms: int) -> dict[str, int]:
    """Consumer config bounding how long an unreachable bootstrap server is tried: 3.0's bootstrap_timeout_ms
    (default 30 s); 2.3 has no such key (its version probe gives up after 2 s) and refuses unknown keys."""
    return {"bootstrap_timeout_ms": ms} if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG else {}


def rebalance_listener(sync: Any) -> Any:
    """The listener to pass to `subscribe`. kafka-python 2.3 calls a listener inside `poll()` on the caller's
    thread. 3.0 calls it on its IO thread, where a blocking consumer call (`committed`, `commit`, offsets
    lookups: what the processor does on assignment and revocation) raises. There, the same callbacks run
    in a worker thread while the IO loop keeps going (heartbeats, those calls) and `poll()` waits for the
    rebalance to finish, as in 2.3."""
    if _InWorker is None:
        return sync
    return _InWorker(sync)


if AsyncConsumerRebalanceListener is not None:

    class _InWorkerListener(AsyncConsumerRebalanceListener):  # type: ignore[misc,valid-type]
        def __init__(self, sync: Any) -> None:
            self.sync = sync
            self.closing = False  # set by the owner before close(): 3.0 revokes on close, 2.3 does not

        async def on_partitions_revoked(self, revoked: Any) -> None:
            if not self.closing:
                await _in_worker(self.sync.on_partitions_revoked, revoked)

        async def on_partitions_assigned(self, assigned: Any) -> None:
            await _in_worker(self.sync.on_partitions_assigned, assigned)

    async def _in_worker(call: Any, arg: Any) -> None:
        done = threading.Event()
        failed: list[BaseException] = []

        def work() -> None:
            try:
                call(arg)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the IO loop below
                failed.append(exc)
            finally:
                done.set()

        threading.Thread(target=work, name="rebalance-listener", daemon=True).start()
        while not done.is_set():
            await KernelEvent("_sleep", 0.005)  # the IO loop's own sleep: it runs other tasks meanwhile
        if failed:
            raise failed[0]

    _InWorker = _InWorkerListener


# 3.0's KafkaConsumer.beginning_offsets takes a timeout; 2.3's waits up to request_timeout_ms (305 s by default)
_OFFSETS_TIMEOUT = "timeout_ms" in inspect.signature(KafkaConsumer.beginning_offsets).parameters


def beginning_offsets(consumer: Any, partitions: Sequence[Any], timeout_ms: int) -> dict[Any, int]:
    """First offsets of `partitions` through the public API, bounded by `timeout_ms` where the line allows it."""
    if _OFFSETS_TIMEOUT:
        return dict(consumer.beginning_offsets(list(partitions), timeout_ms=timeout_ms))
    return dict(consumer.beginning_offsets(list(partitions)))


def node_id(broker: Any) -> int:
    """A cluster-metadata broker's id: `nodeId` (2.3 BrokerMetadata) or `node_id` (3.0 MetadataResponseBroker)."""
    return int(broker.node_id if hasattr(broker, "node_id") else broker.nodeId)


def produce_request(client: Any, acks: int, timeout_ms: int, topic: str, batches: Sequence[tuple[int, bytes]]) -> Any:
    """A ProduceRequest (version <= 8) of ready-made v2 record batches, one per partition."""
    if NEW_PROTOCOL:
        topic_data = ProduceRequest.TopicProduceData
        parts = [topic_data.PartitionProduceData(index=p, records=buf) for p, buf in batches]
        return ProduceRequest(
            transactional_id=None,
            acks=acks,
            timeout_ms=timeout_ms,
            topic_data=[topic_data(name=topic, partition_data=parts)],
            max_version=8,
        )
    version = client.api_version(ProduceRequest, max_version=8)
    kw = {"transactional_id": None} if version >= 3 else {}
    return ProduceRequest[version](required_acks=acks, timeout=timeout_ms, topics=[(topic, list(batches))], **kw)


def produce_errors(response: Any) -> list[tuple[int, int]]:
    """(partition, error code) of every partition in a ProduceResponse whose code is not 0."""
    if NEW_PROTOCOL:
        return [(p.index, p.error_code) for t in response.responses for p in t.partition_responses if p.error_code]
    return [(p[0], p[1]) for _topic, parts in response.topics for p in parts if p[1]]


__all__ = [
    "KafkaClient",
    "NoBrokersAvailable",
    "beginning_offsets",
    "bootstrap_timeout",
    "node_id",
    "produce_errors",
    "produce_request",
    "rebalance_listener",
]
