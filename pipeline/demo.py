"""`pipeline demo`: the whole data path on the embedded broker and SQLite, ending by itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from pipeline.app import all_topics, build_service
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.kafka.broker import resolve_bootstrap
from pipeline.kafka.client import ensure_topics, make_producer, produce_json, read_topic
from pipeline.simulate import simulate_sensors, simulate_transactions, strip_labels

_TX = {
    "transaction_id": "x1",
    "customer_id": "C-bad",
    "terminal_id": "T1",
    "amount": 5.0,
    "timestamp": "2018-05-01T00:00:00Z",
}
BAD_RECORDS: list[tuple[str, bytes]] = [
    ("C-bad", b"{not json"),
    ("C-bad", orjson.dumps({k: v for k, v in _TX.items() if k != "amount"})),
    ("C-bad", orjson.dumps({**_TX, "amount": "lots"})),
    ("bad id!", orjson.dumps({**_TX, "customer_id": "bad id!"})),
    ("C-bad", orjson.dumps(_TX).replace(b"5.0", b"1e999")),
]


def run_demo(
    settings: Settings, *, customers: int, devices: int, console: Console, empty_database: bool = True
) -> dict[str, Any]:
    """empty_database: delete the SQLite file first (the demo's own); otherwise an existing one is refused, so a
    mistyped --database-url never deletes a database the demo did not create."""
    started = time.monotonic()
    if settings.database_url.startswith("sqlite:///"):
        path = Path(settings.database_url.removeprefix("sqlite:///"))
        if not empty_database and path.exists():
            raise ConfigError(
                f"--database-url {path}: exists; the demo starts from an empty database and does not delete one "
                "it did not create (remove it, or pick a new path)"
            )
        path.unlink(missing_ok=True)
    else:  # a server database may hold a real run: the demo writes under a run id of its own
        settings.run_id = f"demo-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    boot, broker = resolve_bootstrap(settings.kafka_bootstrap)
    if settings.kafka_bootstrap:
        # a shared broker: isolate the demo's topics and group
        suffix = f"demo-{int(time.time())}"
        settings.transactions_topic += f"-{suffix}"
        settings.sensors_topic += f"-{suffix}"
        settings.dlq_topic += f"-{suffix}"
        settings.alerts_topic += f"-{suffix}"
        settings.group_id += f"-{suffix}"
    try:
        console.print(
            f"broker {boot} ({'embedded Tansu' if broker else 'external'}); database {settings.database_url}, "
            f"run id {settings.run_id}"
        )
        ensure_topics(boot, all_topics(settings), settings.topic_partitions)
        tx, tx_inj = simulate_transactions(customers, 60, seed=7, burst_customers=3)
        sn, sn_inj = simulate_sensors(devices, 300, seed=8, spike_devices=1, drift_devices=1)
        producer = make_producer(boot)
        produce_json(producer, settings.transactions_topic, ((r["customer_id"], r) for r in strip_labels(tx)))
        produce_json(producer, settings.sensors_topic, ((r["device_id"], r) for r in strip_labels(sn)))
        produce_json(producer, settings.transactions_topic, BAD_RECORDS)
        producer.close()
        console.print(
            f"produced {len(tx)} transactions, {len(sn)} sensor readings, {len(BAD_RECORDS)} malformed records"
        )
        service = build_service(settings, boot)
        try:
            stats = service.processor.run(threading.Event(), idle_exit_s=3.0)
        finally:
            service.close()
        dlq = _read_all(boot, settings.dlq_topic)
        alerts = service.queries.list_alerts(run_id=settings.run_id)
        streams = []
        for name, inj, n in (("transactions", tx_inj, len(tx)), ("sensors", sn_inj, len(sn))):
            ents = {a["entity_id"] for a in alerts if a["stream"] == name}
            streams.append(
                {
                    "stream": name,
                    "scored": n,
                    "alerts": sum(a["stream"] == name for a in alerts),
                    "alerted_entities": len(ents),
                    "injected": len(inj.entities),
                    "caught": len(ents & set(inj.entities)),
                }
            )
        top = [
            a
            for name in ("transactions", "sensors")
            for a in sorted(
                (a for a in alerts if a["stream"] == name), key=lambda a: a["score"] / a["threshold"], reverse=True
            )[:4]
        ]
        return {
            "streams": streams,
            "top_alerts": top,
            "dead_letters": len(dlq),
            "events": stats.events,
            "dlq_reasons": sorted({d["reason"] for d in dlq}),
            "seconds": time.monotonic() - started,
        }
    finally:
        if broker is not None:
            broker.stop()


def _read_all(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in read_topic(bootstrap, topic) if r.value]
