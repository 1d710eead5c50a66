"""The dead-letter sink flushes its producer only when something was sent since the last flush (every
checkpoint calls flush; an idle flush still woke kafka-python's sender thread)."""

from __future__ import annotations

from typing import Any

from pipeline.kafka.client import KafkaDeadLetterSink
from pipeline.records import RawRecord


class _Delivered:
    def failed(self) -> bool:
        return False


class _Producer:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.flushes = 0

    def send(self, topic: str, **kw: Any) -> Any:
        self.sent.append((topic, kw))
        return _Delivered()

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1


def test_flush_only_after_sends() -> None:
    sink = object.__new__(KafkaDeadLetterSink)
    sink.topic, sink.producer, sink.sent, sink._unflushed = "dlq", _Producer(), 0, 0  # type: ignore[assignment]
    sink._queued = []
    sink.flush()
    assert sink.producer.flushes == 0  # type: ignore[attr-defined]
    sink.send(RawRecord("t", 0, 5, b"k", b"{oops", 0), "malformed_json", "bad")
    sink.flush()
    sink.flush()
    assert sink.producer.flushes == 1  # type: ignore[attr-defined]
    assert len(sink.producer.sent) == 1 and sink.sent == 1  # type: ignore[attr-defined]
