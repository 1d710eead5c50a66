"""Bad input on the real broker: each record lands in the dead-letter topic with its reason, and the
processor keeps going (good records around them are scored)."""

from __future__ import annotations

from pathlib import Path

from pipeline.simulate import simulate_sensors, strip_labels
from tests.service_helpers import produce, read_topic, run_cli, run_processor, topic_env

GOOD = b'{"transaction_id":"T1","customer_id":"C1","terminal_id":"T9","amount":10.5,"timestamp":"2018-04-01T00:00:31Z"}'
BAD = {
    "malformed_json": (b"C1", b"{oops"),
    "missing_field": (b"C2", GOOD.replace(b'"amount":10.5,', b"").replace(b'"C1"', b'"C2"')),
    "schema_violation": (b"C3", GOOD.replace(b"10.5", b'"ten"').replace(b'"C1"', b'"C3"')),
    "non_finite_number": (b"C4", GOOD.replace(b"10.5", b"1e999").replace(b'"C1"', b'"C4"')),
    "bad_entity_id": (b"bad id", GOOD.replace(b'"C1"', b'"bad id"')),
    "oversize": (b"C5", GOOD[:-1].replace(b'"C1"', b'"C5"') + b',"x":"' + b"y" * 70000 + b'"}'),
    "key_mismatch": (b"C6", GOOD.replace(b'"C1"', b'"C7"')),
    "empty_value": (b"C8", None),
    "duplicate_key": (b"C10", GOOD.replace(b'"C1"', b'"C10"').replace(b"10.5,", b'25.0,"amount":999999.0,')),
    "timestamp_out_of_range": (
        b"C11",
        GOOD.replace(b'"C1"', b'"C11"').replace(b"2018-04-01T00:00:31Z", b"9999-12-31T23:59:59-23:59"),
    ),
    "missing_key": (None, GOOD.replace(b'"C1"', b'"C12"')),
}


def test_each_bad_record_is_dead_lettered_with_its_reason(
    kafka_bootstrap: str, sqlite_store: object, topic_prefix: str, tmp_path: Path
) -> None:
    env = topic_env(topic_prefix, kafka_bootstrap, sqlite_store.url)  # type: ignore[attr-defined]
    from pipeline.kafka.client import ensure_topics, make_producer

    ensure_topics(kafka_bootstrap, [env["PIPELINE_TRANSACTIONS_TOPIC"]], 4)
    producer = make_producer(kafka_bootstrap, max_request_size=2_000_000)
    for key, value in BAD.values():
        producer.send(env["PIPELINE_TRANSACTIONS_TOPIC"], key=key, value=value)
    producer.send(env["PIPELINE_TRANSACTIONS_TOPIC"], key=b"C1", value=GOOD)
    producer.flush()
    producer.close()
    sensors, _ = simulate_sensors(2, 20, seed=3)
    produce(kafka_bootstrap, env["PIPELINE_SENSORS_TOPIC"], ((r["device_id"], r) for r in strip_labels(sensors)))
    bad_sensor = {"device_id": "pump-9", "timestamp": "2020-03-09T10:00:00Z", "values": {"Current": 1.0}}
    produce(kafka_bootstrap, env["PIPELINE_SENSORS_TOPIC"], [("pump-9", bad_sensor)])
    last = strip_labels(sensors)[-1]  # hours behind its device's latest reading: beyond the allowed lateness
    stale = {**last, "timestamp": last["timestamp"][:11] + "00:00:00Z"}
    produce(kafka_bootstrap, env["PIPELINE_SENSORS_TOPIC"], [(last["device_id"], stale)])

    run_processor(env, log_path=tmp_path / "proc.log")

    dlq = [v for _, v in read_topic(kafka_bootstrap, env["PIPELINE_DLQ_TOPIC"])]
    by_reason = {d["reason"]: d for d in dlq}
    assert set(by_reason) == set(BAD) | {"missing_channels", "out_of_order"}
    assert len(dlq) == len(BAD) + 2
    for reason, (key, _) in BAD.items():
        d = by_reason[reason]
        assert d["source"]["topic"] == env["PIPELINE_TRANSACTIONS_TOPIC"]
        assert d["key"] == (key.decode() if key is not None else None)
        assert d["detail"] or reason in ("oversize", "empty_value") or d["detail"] == ""
    assert by_reason["oversize"]["value_bytes"] > 70000
    assert by_reason["missing_channels"]["detail"].count(",") >= 5
    log = (tmp_path / "proc.log").read_text()
    assert "Traceback" not in log
    assert "events," in log and "dead letters" in log  # processor kept going and reported


def test_a_reading_from_the_future_is_dead_lettered_and_does_not_block_its_device(
    kafka_bootstrap: str, sqlite_store: object, topic_prefix: str, tmp_path: Path
) -> None:
    """Found by probing (2026-12-01): one 2199 timestamp from a bad producer clock was scored, moved its entity's
    latest event time to 2199, and every later real event of the entity was dead-lettered as out_of_order."""
    env = topic_env(topic_prefix, kafka_bootstrap, sqlite_store.url)  # type: ignore[attr-defined]
    readings = strip_labels(simulate_sensors(2, 30, seed=4)[0])
    first = [r for r in readings if r["device_id"] == "pump-0000"]
    wrong_clock = {**first[10], "timestamp": "2199-12-31T23:59:59Z"}
    stream = [*first[:10], wrong_clock, *first[10:], *(r for r in readings if r["device_id"] != "pump-0000")]
    produce(kafka_bootstrap, env["PIPELINE_SENSORS_TOPIC"], ((r["device_id"], r) for r in stream))

    run_processor(env, log_path=tmp_path / "proc.log")

    dlq = [v for _, v in read_topic(kafka_bootstrap, env["PIPELINE_DLQ_TOPIC"])]
    assert [(d["reason"], d["key"]) for d in dlq] == [("from_the_future", "pump-0000")], dlq
    assert "2199-12-31T23:59:59+00:00 is more than max_future_s=3600 ahead" in dlq[0]["detail"]
    log = (tmp_path / "proc.log").read_text()
    assert f"{len(stream)} events, {len(stream) - 1} scored" in log, log[-2000:]


def test_a_dead_letter_topic_the_service_reads_is_refused(topic_prefix: str, tmp_path: Path) -> None:
    """Found by probing: PIPELINE_DLQ_TOPIC = the input topic dead-lettered its own dead letters forever."""
    env = topic_env(topic_prefix, "127.0.0.1:1", f"sqlite:///{tmp_path / 'x.db'}")
    env["PIPELINE_DLQ_TOPIC"] = env["PIPELINE_TRANSACTIONS_TOPIC"]
    done = run_cli("run", "--idle-exit", "1", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"PIPELINE_DLQ_TOPIC '{env['PIPELINE_DLQ_TOPIC']}' is also an input topic" in done.stdout + done.stderr
