"""`pipeline train --stream NAME --topic T --from --to` on the real broker: the replay reader's range, decoded with
the stream's decoder, gives the same card statistics as the CSV export of the same records; rows that operators
labelled as anomalies in the real database are left out, and the model is registered as a version."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import insert

from pipeline.kafka.client import ensure_topics, make_producer, produce_json
from pipeline.sinks import AlertQueries, Database
from pipeline.sinks.tables import alerts
from pipeline.train.cli import train_stream_command
from pipeline.train.data import read_files
from pipeline.train.history import TrainOptions, train_on_history
from tests.unit.test_train_own_data import PLANT, pump_rows, pumps_stream, write_csv

FROM_MS = 1_714_000_000_000  # Kafka record times of the range; the readings' own times are in the records
FAST = TrainOptions(epochs=2)


def _wire(rec: dict[str, Any]) -> dict[str, Any]:
    """The stream names its entity field pump_id: the record keeps the sensor layout under that name."""
    return {"pump_id": rec["device_id"], "timestamp": rec["timestamp"], "values": rec["values"]}


def _produce(bootstrap: str, topic: str) -> None:
    """The fixture rows inside [FROM_MS, FROM_MS + 10 min), five invalid records among them, and valid readings of
    another pump before and after the range (which must not be read)."""
    rows = pump_rows()
    outside = [{**r, "device_id": "X9"} for r in pump_rows(entities=1, seed=5)]
    body: list[tuple[str | None, Any]] = [(r["device_id"], _wire(r)) for r in rows]
    body += [("P1", b"{not json"), ("P2", orjson.dumps({**_wire(rows[0]), "values": {"pressure": 1.0}}))]
    # valid readings the service dead-letters for their key (they were trained on, as one-row pumps)
    body += [(None, _wire({**rows[0], "device_id": "P7"})), ("P1", _wire({**rows[0], "device_id": "P8"}))]
    # an at-least-once resend of a reading: trained on once (it refused the whole topic as a second row)
    body += [(rows[5]["device_id"], _wire(rows[5]))]
    stamps = [FROM_MS + i for i in range(len(body))]
    body += [(r["device_id"], _wire(r)) for r in outside] * 2
    stamps += [FROM_MS - 60_000] * len(outside) + [FROM_MS + 600_000] * len(outside)
    ensure_topics(bootstrap, [topic], 2)
    producer = make_producer(bootstrap)
    try:
        produce_json(producer, topic, body, stamps)
    finally:
        producer.close()


def _comparable(card: dict[str, Any]) -> dict[str, Any]:
    """What the data decides: everything but where it came from and how long training took."""
    data = {k: v for k, v in card["data"].items() if k != "sources"}
    data["rows"] = {k: v for k, v in data["rows"].items() if k not in ("read", "skipped_invalid")}
    metrics = {k: v for k, v in card["metrics"].items() if k != "train_seconds"}
    keep = ("version", "threshold", "config", "feature_names", "channels", "channel_stats", "training")
    return {"data": data, "metrics": metrics, **{k: card[k] for k in keep}}


def test_topic_range_and_csv_give_the_same_card(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}-pumps"
    _produce(kafka_bootstrap, topic)
    streams_file = tmp_path / "plant.toml"
    streams_file.write_text(PLANT.format(entity="pump_id"))
    to_ms = FROM_MS + 600_000
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            "--stream",
            "pumps",
            "--streams-file",
            str(streams_file),
            "--topic",
            topic,
            "--from",
            datetime.fromtimestamp(FROM_MS / 1000, timezone.utc).isoformat(),
            "--to",
            str(to_ms),
            "--bootstrap",
            kafka_bootstrap,
            "--epochs",
            str(FAST.epochs),
            "--out",
            str(tmp_path / "topic"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr
    skipped = "{'duplicate': 1, 'key_mismatch': 1, 'malformed_json': 1, 'missing_channels': 1, 'missing_key': 1}"
    assert f"invalid records skipped: {skipped}" in done.stdout, done.stdout
    topic_card = json.loads((tmp_path / "topic" / "pumps.card.json").read_text())

    stream = pumps_stream(entity_key="pump_id")
    csv = write_csv(tmp_path / "pumps.csv", pump_rows(), entity_key="pump_id")
    csv_card = json.loads(json.dumps(train_on_history(stream, read_files([csv], stream), tmp_path / "csv", FAST).card))

    assert topic_card["data"]["rows"]["read"] == 605 and csv_card["data"]["rows"]["read"] == 600
    assert topic_card["data"]["sources"] == [f"{topic}[0]", f"{topic}[1]"]
    assert topic_card["data"]["entities"] == 3  # the pump outside the range was not read
    assert _comparable(topic_card) == _comparable(csv_card)


def test_labelled_rows_are_skipped_and_the_model_registered(pg_url: str, tmp_path: Path) -> None:
    db = Database(pg_url)
    db.create_schema()
    rows = pump_rows()
    try:
        with db.engine.begin() as conn:
            ids = [
                conn.execute(
                    insert(alerts).values(**_alert(tmp_path.name, i, rows[i])).returning(alerts.c.id)
                ).scalar_one()
                for i in (10, 11, 12)
            ]
        queries = AlertQueries(db)
        queries.label("tp", alert_id=ids[0])
        queries.label("tp", alert_id=ids[1])
        queries.label("fp", alert_id=ids[2])  # a false positive is normal traffic: it stays
    finally:
        db.dispose()
    streams_file = tmp_path / "plant.toml"
    streams_file.write_text(PLANT.format(entity="device_id"))
    train_stream_command(
        "pumps",
        data=[write_csv(tmp_path / "pumps.csv", rows)],
        topic=None,
        from_time=None,
        to_time=None,
        bootstrap=None,
        streams_file=streams_file,
        out_dir=tmp_path / "out",
        options=FAST,
        database_url=pg_url,
        register=True,
    )
    card = json.loads((tmp_path / "out" / "pumps.card.json").read_text())
    assert card["data"]["rows"]["skipped_labelled"] == 2
    assert card["data"]["rows"]["train"] + card["data"]["rows"]["held_out"] == 598

    from pipeline.registry import ModelRegistry
    from pipeline.sinks.registry import SqlRegistryStore

    store = SqlRegistryStore.connect(pg_url)
    try:
        versions = ModelRegistry(store).list("pumps")
    finally:
        store.dispose()
    assert [v.card["content_sha256"] for v in versions][-1:] == [card["content_sha256"]]


def _alert(run: str, i: int, rec: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {
        "alert_key": f"{run}|pumps|0|{i}|m@1",
        "run_id": run[:64],
        "stream": "pumps",
        "entity_id": rec["device_id"],
        "event_time": datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")),
        "score": 50.0,
        "threshold": 10.0,
        "severity": "high",
        "model_version": "m@1",
        "top_features": [],
        "source_topic": "plant.pumps",
        "source_partition": 0,
        "source_offset": i,
        "created_at": now,
    }
