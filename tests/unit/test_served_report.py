"""pipeline.evaluate.served: the handbook CSV as wire records, and a run's alerts scored against its labels."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from pipeline.checkpointing.rows import AlertRow
from pipeline.errors import ConfigError
from pipeline.evaluate.served import records, report
from pipeline.features.streams import LabelStream, TransactionStream
from pipeline.sinks import AlertQueries, Database, SqlCheckpointStore
from tests.handbook_helpers import handbook_csv


def test_records_are_valid_wire_records_in_event_time_order(tmp_path: Path) -> None:
    csv = handbook_csv(tmp_path / "tx.csv")
    payments, labels = records(csv, from_day=5, delay_days=2)
    tx, lab = TransactionStream(), LabelStream()
    ts = [tx.parse(p).timestamp for p in payments]
    known = [lab.parse(r).labelled_at for r in labels]
    assert ts == sorted(ts) and known == sorted(known)
    first = datetime(2018, 4, 6, tzinfo=timezone.utc)
    assert min(ts) >= first and len(payments) < 240
    # labels of payments from day 3 on, each known two days later and never after the file's last payment
    assert min(known) >= datetime(2018, 4, 6, tzinfo=timezone.utc) and max(known) <= max(ts)
    with pytest.raises(ConfigError, match="--from-day"):
        records(csv, from_day=99)


def test_report_matches_alerts_to_payments_and_counts_the_test_days(tmp_path: Path) -> None:
    csv = handbook_csv(tmp_path / "tx.csv")
    df = pd.read_csv(csv)
    df["TX_DATETIME"] = pd.to_datetime(df["TX_DATETIME"])
    test = df[df["TX_DATETIME"] >= pd.Timestamp("2018-04-09")]  # 10 days, last 20 % = days 8, 9
    fraud, legit = test[test.TX_FRAUD == 1].iloc[:2], test[test.TX_FRAUD == 0].iloc[:1]
    early = df[df["TX_DATETIME"] < pd.Timestamp("2018-04-02")].iloc[:1]
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    db.create_schema()

    def alert(i: int, row: pd.Series, entity: str | None = None) -> AlertRow:
        t = row["TX_DATETIME"].to_pydatetime().replace(tzinfo=timezone.utc)
        return AlertRow(
            f"r|tx|0|{i}|m",
            "r",
            "transactions",
            entity or str(row["CUSTOMER_ID"]),
            t,
            9.0,
            1.0,
            "high",
            "m",
            [],
            "tx",
            0,
            i,
        )

    rows = [alert(i, r) for i, (_, r) in enumerate(pd.concat([fraud, legit, early]).iterrows())]
    rows.append(alert(99, legit.iloc[0], entity="nobody"))
    SqlCheckpointStore(db).write_checkpoint("r", "g", rows, [], [])
    queries = AlertQueries(db)
    out = report(queries, "r", csv)
    assert out["alerts"] == 5 and out["unmatched_alerts"] == 1 and out["test_days"] == 2
    assert out["test_alerts"] == 3 and out["test_frauds_alerted"] == 2
    assert out["test_alert_precision"] == pytest.approx(2 / 3)
    assert out["test_frauds"] == int(test.TX_FRAUD.sum())
    assert report(queries, "other", csv)["alerts"] == 0
    db.dispose()
