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
