"""The served transactions model, measured: the handbook CSV goes into the topics (payments, and each
payment's label known `delay_days` later), `pipeline run` processes them as it would live, and its alerts
are then scored against the labels. This is how README "Label feedback" measured the service.

    python -m pipeline.evaluate.served produce --data CSV --from-day 78      # KAFKA_BOOTSTRAP, topics from env
    PIPELINE_MODELS_DIR=models-fb pipeline run --idle-exit 5
    python -m pipeline.evaluate.served report --data CSV                     # DATABASE_URL, PIPELINE_RUN_ID

`pipeline evaluate` gives the ranking metrics (AUC, AP, CP@100); this gives what an operator sees: the
alerts the service raised in the test days and how many of them, and of the frauds, were right.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Settings
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluate.transactions import first_test_day, in_time_order, read
from pipeline.features.streams import DAY
from pipeline.simulate import iso
from pipeline.sinks import AlertQueries, Database


def records(path: Path, *, from_day: int, delay_days: float = 7.0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(payments from `from_day` on, labels known within the file's span for payments from `from_day - delay`),
    both in wire format and in event-time order (labels by labelled_at)."""
    payments, labels, _, _ = _records(path, from_day=from_day, delay_days=delay_days)
    return payments, labels


def _records(
    path: Path, *, from_day: int, delay_days: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int], list[int]]:
    """`records` plus each record's event time in epoch milliseconds (the Kafka timestamps)."""
    df, ts, day = in_time_order(read(path))
    if from_day < 0 or from_day > int(day.max()):
        raise ConfigError(f"--from-day {from_day}: the file has days 0-{int(day.max())}")
    known = ts + delay_days * DAY
    ids = [str(i) for i in range(len(df))]
    cust, term = df["CUSTOMER_ID"].astype(str).tolist(), df["TERMINAL_ID"].astype(str).tolist()
    amount, fraud = df["TX_AMOUNT"].to_numpy(np.float64), df["TX_FRAUD"].to_numpy()
    pay_idx = np.flatnonzero(day >= from_day)
    lab_idx = np.flatnonzero((day >= from_day - np.ceil(delay_days)) & (known <= ts[-1]))
    lab_idx = lab_idx[np.argsort(known[lab_idx], kind="stable")]
    payments = [
        {
            "transaction_id": ids[i],
            "customer_id": cust[i],
            "terminal_id": term[i],
            "amount": float(amount[i]),
            "timestamp": iso(float(ts[i])),
        }
        for i in pay_idx.tolist()
    ]
    labels = [
        {
            "transaction_id": ids[i],
            "customer_id": cust[i],
            "terminal_id": term[i],
            "is_fraud": bool(fraud[i]),
            "labelled_at": iso(float(known[i])),
        }
        for i in lab_idx.tolist()
    ]
    return (
        payments,
        labels,
        np.rint(ts[pay_idx] * 1000).astype(np.int64).tolist(),
        np.rint(known[lab_idx] * 1000).astype(np.int64).tolist(),
    )


def produce(
    settings: Settings, bootstrap: str, path: Path, *, from_day: int, delay_days: float = 7.0, fanout: bool = True
) -> dict[str, int]:
    """Payments to the transactions topic, labels to the labels topic (fanned out to every partition unless
    fanout=False), keyed by customer, Kafka timestamps = event times."""
    from pipeline.kafka.client import ensure_topics, make_producer, produce_json, produce_labels

    payments, labels, pay_ms, lab_ms = _records(path, from_day=from_day, delay_days=delay_days)
    ensure_topics(bootstrap, [settings.transactions_topic, settings.labels_topic], settings.topic_partitions)
    producer = make_producer(bootstrap)
    try:
        n_lab = produce_labels(producer, settings.labels_topic, labels, fanout=fanout, timestamp_ms=lab_ms)
        n_pay = produce_json(producer, settings.transactions_topic, [(r["customer_id"], r) for r in payments], pay_ms)
    finally:
        producer.close()
    return {"payments": n_pay, "labels": len(labels), "label_records": n_lab}


def report(queries: AlertQueries, run_id: str, path: Path, *, test_fraction: float = 0.2) -> dict[str, Any]:
    """The run's transactions alerts against the CSV's labels, over the test days of `pipeline evaluate`'s
    split (the last `test_fraction` of days). Alerts are matched to payments by (customer, event time)."""
    df, ts, day = in_time_order(read(path))
    n_days = int(day.max()) + 1
    first_test = first_test_day(n_days, test_fraction)
    key = pd.Series(
        np.arange(len(df)),
        index=pd.MultiIndex.from_arrays([df["CUSTOMER_ID"].astype(str).to_numpy(), np.rint(ts).astype(np.int64)]),
    )
    key = key[~key.index.duplicated()]
    rows = queries.list_alerts(run_id=run_id, stream="transactions")
    hits: list[int] = []
    unmatched = 0
    for a in rows:
        t = a["event_time"]
        t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t
        i = key.get((str(a["entity_id"]), int(round(t.timestamp()))))
        if i is None:
            unmatched += 1
        else:
            hits.append(int(i))
    idx = np.unique(np.asarray(hits, np.int64))
    fraud = df["TX_FRAUD"].to_numpy().astype(bool)
    in_test = idx[day[idx] >= first_test]
    test_frauds = int(fraud[day >= first_test].sum())
    caught = int(fraud[in_test].sum())
    return {
        "run_id": run_id,
        "alerts": len(rows),
        "unmatched_alerts": unmatched,
        "test_days": n_days - first_test,
        "test_alerts": len(in_test),
        "test_alert_precision": caught / len(in_test) if len(in_test) else 0.0,
        "test_frauds": test_frauds,
        "test_frauds_alerted": caught,
        "test_fraud_recall": caught / test_frauds if test_frauds else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate.served", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("produce", help="handbook CSV -> transactions and labels topics")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--from-day", type=int, required=True, help="first day of payments to produce")
    p.add_argument("--delay-days", type=float, default=7.0, help="a label is known this long after its payment")
    p.add_argument("--no-fanout", action="store_true", help="labels only to their customer's partition")
    r = sub.add_parser("report", help="the run's alerts against the CSV's labels (JSON)")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--test-fraction", type=float, default=0.2)
    args = ap.parse_args(argv)
    settings = Settings()
    try:
        if args.cmd == "produce":
            if not settings.kafka_bootstrap:
                raise ConfigError("set KAFKA_BOOTSTRAP (e.g. a `pipeline broker` or the docker-compose Kafka)")
            out: dict[str, Any] = produce(
                settings,
                settings.kafka_bootstrap,
                args.data,
                from_day=args.from_day,
                delay_days=args.delay_days,
                fanout=not args.no_fanout,
            )
        else:
            db = Database(settings.database_url)
            try:
                out = report(AlertQueries(db), settings.run_id, args.data, test_fraction=args.test_fraction)
            finally:
                db.dispose()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
