"""pipeline.evaluate.served produce: the CSV's payments and fanned-out labels land in the real broker."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.config import Settings
from pipeline.evaluate.served import produce, records
from pipeline.kafka.client import read_topic
from tests.handbook_helpers import handbook_csv


def test_produce_writes_payments_and_fans_labels_out(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    csv = handbook_csv(tmp_path / "tx.csv")
    s = Settings(transactions_topic=f"{topic_prefix}-tx", labels_topic=f"{topic_prefix}-labels", topic_partitions=3)
    out = produce(s, kafka_bootstrap, csv, from_day=4, delay_days=2)
    payments, labels = records(csv, from_day=4, delay_days=2)
    assert out == {"payments": len(payments), "labels": len(labels), "label_records": 3 * len(labels)}
    tx = read_topic(kafka_bootstrap, s.transactions_topic)
    lab = read_topic(kafka_bootstrap, s.labels_topic)
    assert len(tx) == len(payments) and len(lab) == 3 * len(labels)
    assert all(r.key is not None for r in tx)
    per_partition = Counter(r.partition for r in lab)
    assert per_partition == {0: len(labels), 1: len(labels), 2: len(labels)}  # every label in every partition


def test_pipeline_produce_says_a_stream_files_streams_are_not_simulated(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """With PIPELINE_STREAMS_FILE set, `produce sensors` wrote the bundled layout to sensor-readings without a
    word, a topic and channels the served stream does not read."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    plant = tmp_path / "plant.toml"
    plant.write_text("# a plant's own streams\n")
    env = {"PIPELINE_STREAMS_FILE": str(plant), "PIPELINE_SENSORS_TOPIC": f"{topic_prefix}-sensors"}
    res = CliRunner().invoke(
        app, ["produce", "sensors", "--bootstrap", kafka_bootstrap, "--entities", "2", "--events-per-entity", "3"],
        env=env,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"note: produce writes the bundled sensors layout; the streams of {plant} are not simulated" in res.output
    assert len(read_topic(kafka_bootstrap, f"{topic_prefix}-sensors")) == 6
