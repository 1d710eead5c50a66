"""Compressed batches from librdkafka (confluent-kafka, the most common producer): the same payments in every
codec give the same alerts from `pipeline run`; a codec this install cannot decode stops only that partition
with one ERROR line naming topic, partition and offset, and readiness says so (never a crash loop)."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.kafka.client import ensure_topics
from pipeline.simulate import simulate_transactions, strip_labels
from tests.service_helpers import run_processor, start_processor, topic_env
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import alert_set, event_ms

confluent_kafka = pytest.importorskip("confluent_kafka", reason="confluent-kafka is a dev dependency")

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def payments() -> list[dict[str, Any]]:
    txs, _ = simulate_transactions(60, 30, seed=11, burst_customers=4)
    return sorted(strip_labels(txs), key=lambda r: r["timestamp"])


def produce_confluent(bootstrap: str, topic: str, recs: list[dict[str, Any]], codec: str) -> None:
    """Keyed by customer; murmur2 partitioner, so each customer lands where kafka-python would put it."""
    ensure_topics(bootstrap, [topic], 4)
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "compression.type": codec,
            "partitioner": "murmur2_random",
            "linger.ms": 20,
            "batch.num.messages": 500,
            "acks": "all",
            "enable.idempotence": True,
        }
    )
    errors: list[Any] = []
    for r in recs:
        producer.produce(
            topic,
            key=r["customer_id"].encode(),
            value=orjson.dumps(r),
            timestamp=event_ms(r),
            on_delivery=lambda err, _msg: errors.append(err) if err is not None else None,
        )
        producer.poll(0)
    assert producer.flush(60) == 0, "undelivered records"
    assert not errors, errors[:3]


def test_every_codec_gives_the_same_alerts(
    kafka_bootstrap: str, pg_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    recs = payments()
    results = {}
    for codec in CODECS:
        env = topic_env(f"{topic_prefix}{codec}", kafka_bootstrap, pg_store.url, run_id=codec)
        produce_confluent(kafka_bootstrap, env["PIPELINE_TRANSACTIONS_TOPIC"], recs, codec)
        log = tmp_path / f"{codec}.log"
        run_processor(env, log_path=log)
        assert "Traceback" not in log.read_text() and "ERROR" not in log.read_text(), log.read_text()[-2000:]
        results[codec] = alert_set(pg_store, codec)
    assert results["none"], "the uncompressed run raised alerts"
    for codec in CODECS[1:]:
        assert results[codec] == results["none"], codec


def test_an_undecodable_codec_stops_the_partition_with_one_error(
    kafka_bootstrap: str, pg_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    """lz4 made unavailable in the processor (a sitecustomize turns kafka-python's check off): the lz4
    partition stops, /readyz is 503 with the position, the log has one ERROR for it and no traceback, and the
    other partitions are scored."""
    env = topic_env(topic_prefix, kafka_bootstrap, pg_store.url, run_id="nolz4")
    topic = env["PIPELINE_TRANSACTIONS_TOPIC"]
    recs = payments()
    ensure_topics(kafka_bootstrap, [topic], 4)
    # partition 0 in lz4, the rest uncompressed
    lz4 = confluent_kafka.Producer({"bootstrap.servers": kafka_bootstrap, "compression.type": "lz4"})
    plain = confluent_kafka.Producer({"bootstrap.servers": kafka_bootstrap, "compression.type": "none"})
    for r in recs:
        p = int(r["customer_id"][1:]) % 4
        (lz4 if p == 0 else plain).produce(
            topic, key=r["customer_id"].encode(), value=orjson.dumps(r), partition=p, timestamp=event_ms(r)
        )
    assert lz4.flush(30) == 0 and plain.flush(30) == 0
    per_partition = {p: sum(1 for r in recs if int(r["customer_id"][1:]) % 4 == p) for p in range(4)}

    sitecustomize = tmp_path / "site" / "sitecustomize.py"
    sitecustomize.parent.mkdir()
    sitecustomize.write_text("import kafka.codec\nkafka.codec.has_lz4 = lambda: False\n")
    env["PYTHONPATH"] = f"{sitecustomize.parent}:{env.get('PYTHONPATH', '')}"
    port = _free_port()
    log = tmp_path / "proc.log"
    proc = start_processor(env, "--api-port", str(port), log_path=log)
    try:
        deadline = time.monotonic() + 120
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"processor exited with {proc.returncode}\n{log.read_text()[-3000:]}"
            body = _readyz(port)
            if "partitions stopped" in str(body.get("status")):
                break
            time.sleep(0.5)
        assert f"topic {topic} partition 0 offset 0" in str(body.get("status")), body

        # the other partitions go on: their outputs become durable up to their ends; partition 0 stays at 0
        def durable() -> dict[int, int | None]:
            saved = pg_store.load_offsets("nolz4", env["PIPELINE_GROUP_ID"])
            return {p: saved.get((topic, p), (None, None))[0] for p in range(4)}

        ok = _wait(lambda: all(durable()[p] == per_partition[p] for p in (1, 2, 3)), 120)
        assert ok, f"{durable()} vs {per_partition}\n{log.read_text()[-3000:]}"
        assert durable()[0] in (None, 0)
        time.sleep(3)  # several more polls: still exactly one ERROR
        text = log.read_text()
        errors = [line for line in text.splitlines() if "ERROR" in line]
        assert len(errors) == 1, errors
        assert re.search(rf"stopped consuming topic {topic} partition 0 offset 0: .*lz4", errors[0]), errors[0]
        assert "Traceback" not in text
        assert _readyz(port)["status"].startswith("partitions stopped")
    finally:
        proc.terminate()
        proc.wait(60)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _readyz(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return dict(orjson.loads(r.read()))
    except urllib.error.HTTPError as exc:
        return dict(orjson.loads(exc.read()))
    except OSError:
        return {}


def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.5)
    return False
