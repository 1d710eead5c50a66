"""build_service that fails after it opened its Kafka clients closes them (they hold sockets and a heartbeat
thread), on the real broker."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.app as app_module
from pipeline.config import Settings
from pipeline.kafka.client import KafkaDeadLetterSink, KafkaSource


def test_clients_are_closed_when_construction_fails(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []

    class Source(KafkaSource):
        def close(self) -> None:
            closed.append("source")
            super().close()

    class DeadLetters(KafkaDeadLetterSink):
        def close(self) -> None:
            closed.append("dlq")
            super().close()

    def broken_processor(*_: object, **__: object) -> None:
        raise RuntimeError("injected: processor construction failed")

    monkeypatch.setattr(app_module, "KafkaSource", Source)
    monkeypatch.setattr(app_module, "KafkaDeadLetterSink", DeadLetters)
    monkeypatch.setattr(app_module, "Processor", broken_processor)
    s = Settings(
        database_url=f"sqlite:///{tmp_path}/db.sqlite",
        transactions_topic=f"{topic_prefix}-tx",
        sensors_topic=f"{topic_prefix}-sensors",
        dlq_topic=f"{topic_prefix}-dlq",
        alerts_topic=f"{topic_prefix}-alerts",
        labels_topic=f"{topic_prefix}-labels",
    )
    with pytest.raises(RuntimeError, match="injected"):
        app_module.build_service(s, kafka_bootstrap)
    assert sorted(closed) == ["dlq", "source"]
