"""Helpers for tests that run the real Processor in-process (threads) on the real broker, and replays."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.alerts.lifecycle import IncidentTracker
from pipeline.app import build_scorers, ensure_models
from pipeline.checkpointing import Relay
from pipeline.config import Settings
from pipeline.kafka.client import KafkaDeadLetterSink, KafkaSource, ensure_topics, make_producer, produce_json
from pipeline.processor import Processor, ProcessorOptions
from pipeline.simulate import simulate_sensors, strip_labels
from tests.sql_helpers import SqlTestStore

PARTITIONS = 4


def settings_for(prefix: str, db_url: str) -> Settings:
    s = Settings()
    s.sensors_topic = f"{prefix}-sensors"
    s.transactions_topic = f"{prefix}-tx"
    s.dlq_topic = f"{prefix}-dlq"
    s.database_url = db_url
    s.group_id = f"{prefix}-group"
    s.models_dir = None
    s.device = "cpu"
    return s


def sensor_records(
    devices: int, readings: int, *, seed: int = 3, start: float = 1_583_748_873.0
) -> list[dict[str, Any]]:
    recs, _ = simulate_sensors(
        devices, readings, seed=seed, start=start, spike_devices=2, drift_devices=1, anomaly_len=15
    )
    return strip_labels(recs)


def event_ms(rec: dict[str, Any]) -> int:
    from datetime import datetime

    return int(round(datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp() * 1000))


def produce_sensors(bootstrap: str, topic: str, recs: list[dict[str, Any]], *, create: bool = True) -> None:
    """Keyed by device (so a device's readings stay in order on one partition); record time = event time."""
    if create:
        ensure_topics(bootstrap, [topic], PARTITIONS)
    producer = make_producer(bootstrap)
    try:
        produce_json(producer, topic, ((r["device_id"], r) for r in recs), [event_ms(r) for r in recs])
    finally:
        producer.close()


def make_processor(
    settings: Settings,
    bootstrap: str,
    db: SqlTestStore,
    *,
    run_id: str = "live",
    tracker: IncidentTracker | None = None,
    relay: Relay | None = None,
    **opts: Any,
) -> tuple[Processor, KafkaSource, KafkaDeadLetterSink]:
    ensure_topics(bootstrap, [settings.sensors_topic, settings.dlq_topic], PARTITIONS)
    scorers = build_scorers(settings, {"sensors": ensure_models(settings)["sensors"]})
    source = KafkaSource(bootstrap, settings.group_id, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    dlq = KafkaDeadLetterSink(bootstrap, settings.dlq_topic)
    options = ProcessorOptions(run_id=run_id, group_id=settings.group_id, **opts)
    return Processor(source, db, dlq, scorers, options, tracker=tracker, relay=relay), source, dlq


class Runner:
    """A Processor.run in a thread, with a stop switch."""

    def __init__(self, processor: Processor, **run_kwargs: Any) -> None:
        self.processor = processor
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, kwargs=run_kwargs, daemon=True)

    def _run(self, **kw: Any) -> None:
        try:
            self.processor.run(self.stop, **kw)
        except BaseException as exc:  # noqa: BLE001 - surfaced by join()
            self.error = exc

    def start(self) -> Runner:
        self.thread.start()
        return self

    def join(self, timeout: float = 60.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "processor did not stop in time"
        if self.error is not None:
            raise self.error


def stop_workers(runners: Sequence[Runner], clients: Sequence[Any], timeout: float = 30.0) -> None:
    """Stop every runner first (none waits on a peer's rebalance), join them, then close their clients."""
    for r in runners:
        r.stop.set()
    for r in runners:
        r.join(timeout)
    for c in clients:
        c.close()


def wait_until(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def alert_set(db: SqlTestStore, run_id: str, digits: int = 4) -> set[tuple[str, int, int, float]]:
    """(entity, partition, offset, score rounded to `digits` significant digits)"""
    return {
        (a["entity_id"], a["source_partition"], a["source_offset"], float(f"{a['score']:.{digits}g}"))
        for a in db.list_alerts(run_id=run_id)
    }


def position_set(db: SqlTestStore, run_id: str) -> set[tuple[str, int, int]]:
    alerts = db.list_alerts(run_id=run_id)
    return {(a["entity_id"], a["source_partition"], a["source_offset"]) for a in alerts}
