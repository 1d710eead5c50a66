"""`pipeline alerts list|tail|ack|label`: look at alerts and incidents, follow the alerts topic, and give
operator feedback (acknowledge; label true/false positive)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer
from rich.console import Console
from rich.table import Table

from pipeline.checkpointing.rows import MAX_ROW_ID
from pipeline.config import Settings
from pipeline.errors import ConfigError

if TYPE_CHECKING:  # the SQL layer is imported on first use: `pipeline --help` stays quick
    from pipeline.features.streams import StreamSpec
    from pipeline.sinks import AlertQueries

alerts_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Alerts and incidents: list, follow the alerts topic, acknowledge, label.",
)
out = Console()
err = Console(stderr=True)

DbOpt = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy URL; default DATABASE_URL")]
RunOpt = Annotated[str | None, typer.Option("--run-id", help="only this run (default: all runs)")]
_REL = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
STATUSES = ("open", "resolved", "acked", "unacked", "tp", "fp", "unlabeled")


def _title(n: int, what: str, limit: int) -> str:
    """A list cut at --limit says so: "100 alerts" read as all of them when thousands matched."""
    return f"the newest {n} {what} (--limit {limit}; there may be more)" if n >= limit else f"{n} {what}"


def register(app: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")


def parse_since(value: str | None, now: datetime | None = None, *, name: str = "--since") -> datetime | None:
    """ISO-8601 time (UTC if no offset) or a relative age: 30s, 15m, 2h, 7d, 1w. `name`: the option or
    query parameter the value came from, for the error."""
    if value is None:
        return None
    m = _REL.match(value.strip())
    if m:
        try:
            return (now or datetime.now(timezone.utc)) - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
        except OverflowError:
            raise ConfigError(f"{name} {value!r}: that age reaches before the year 1") from None
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{name} {value!r}: give an ISO time (2024-05-01T12:00Z) or an age (15m, 2h, 7d)") from None
    try:  # in UTC, so a time the database compares is within years 1..9999 (e.g. not 9999-12-31T23:59-23:59)
        return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except OverflowError:
        raise ConfigError(f"{name} {value!r}: in UTC that time is outside the years 1..9999") from None


@contextmanager
def _queries(database_url: str | None) -> Iterator[AlertQueries]:
    """The alert database (schema brought to head), disposed of when the block ends."""
    from pipeline.sinks import AlertQueries, Database

    db = Database(database_url or Settings().database_url, existing=True)
    try:
        db.create_schema()
        yield AlertQueries(db)
    finally:
        db.dispose()


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    from pipeline.sinks.queries import row_to_json

    return row_to_json(row)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


@alerts_app.command("list")
def list_cmd(
    entity: Annotated[str | None, typer.Option("--entity", help="only this entity id")] = None,
    since: Annotated[str | None, typer.Option("--since", help="by event time: ISO time or age (15m, 2h, 7d)")] = None,
    after_id: Annotated[
        int | None,
        typer.Option(
            "--after-id",
            min=0,
            max=MAX_ROW_ID,
            help="alerts stored after this alert id, oldest first (a poller's cursor: pass the last id seen)",
        ),
    ] = None,
    status: Annotated[str | None, typer.Option("--status", help="|".join(STATUSES))] = None,
    stream: Annotated[str | None, typer.Option("--stream")] = None,
    incidents: Annotated[bool, typer.Option("--incidents", help="list incidents instead of alerts")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_ROW_ID)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array on stdout")] = False,
    database_url: DbOpt = None,
    run_id: RunOpt = None,
) -> None:
    """List alerts (or incidents), newest event time first; with --after-id, in the order they were stored."""
    if status is not None and status not in STATUSES:
        raise ConfigError(f"--status must be one of {', '.join(STATUSES)}")
    if incidents and after_id is not None:
        raise ConfigError("--after-id is a cursor over alerts, not incidents")
    with _queries(database_url) as queries:
        t0 = parse_since(since)
        if run_id is not None and not queries.known_run(run_id):
            typer.echo(f"note: run {run_id!r} wrote nothing to this database (a typo?)", err=True)
        if incidents:
            rows = queries.list_incidents(
                run_id=run_id, status=status, entity_id=entity, stream=stream, since=t0, limit=limit
            )
        else:
            rows = queries.query_alerts(
                run_id=run_id,
                entity_id=entity,
                stream=stream,
                since=t0,
                status=status,
                after_id=after_id,
                limit=limit,
            )
    if as_json:
        _print_json([_jsonable(r) for r in rows])
        return
    if incidents:
        table = Table(title=_title(len(rows), "incidents", limit))
        for col in (
            "id",
            "status",
            "stream",
            "entity",
            "severity",
            "opened",
            "last alert",
            "alerts",
            "peak",
            "ack",
            "label",
        ):
            table.add_column(col)
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["status"],
                r["stream"],
                r["entity_id"],
                r["severity"],
                str(r["opened_at"])[:19],
                str(r["last_alert_at"])[:19],
                str(r["alert_count"]),
                f"{r['peak_score']:.3g}/{r['peak_threshold']:.3g}",
                "yes" if r["acked_at"] else "",
                r["label"] or "",
            )
    else:
        table = Table(title=_title(len(rows), "alerts", limit))
        for col in (
            "id",
            "event time",
            "stream",
            "entity",
            "score",
            "threshold",
            "severity",
            "incident",
            "ack",
            "label",
        ):
            table.add_column(col)
        for r in rows:
            inc = f"{r['incident_id']} ({r['incident_status']})" if r.get("incident_id") is not None else ""
            table.add_row(
                str(r["id"]),
                str(r["event_time"])[:19],
                r["stream"],
                r["entity_id"],
                f"{r['score']:.3g}",
                f"{r['threshold']:.3g}",
                r["severity"],
                inc,
                "yes" if r["acked_at"] else "",
                r["label"] or "",
            )
    out.print(table)


@alerts_app.command("tail")
def tail_cmd(
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap; default KAFKA_BOOTSTRAP")] = None,
    topic: Annotated[str | None, typer.Option(help="default: the alerts topic setting")] = None,
    from_beginning: Annotated[bool, typer.Option("--from-beginning")] = False,
    max_messages: Annotated[int | None, typer.Option(help="exit after this many messages")] = None,
    idle_exit: Annotated[float | None, typer.Option(help="exit after this many seconds without a message")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="raw JSON lines")] = False,
) -> None:
    """Follow the alerts topic (incident opened / updated / resolved messages)."""
    from pipeline.kafka.tail import follow

    s = Settings()
    boot = bootstrap or s.kafka_bootstrap
    if not boot:
        raise ConfigError("set --bootstrap or KAFKA_BOOTSTRAP")
    # on stderr, so --json output stays clean: a broker that does not answer takes kafka-python's 30 s to say so
    typer.echo(f"following {topic or s.alerts_topic} on {boot} (Ctrl-C stops)", err=True)
    stream = follow(boot, topic or s.alerts_topic, from_beginning=from_beginning, idle_timeout_s=idle_exit)
    for n, (key, value) in enumerate(stream, start=1):
        if as_json:
            sys.stdout.write(value.decode("utf-8", "replace") + "\n")
            sys.stdout.flush()
        else:
            try:
                m = json.loads(value)
                inc = m.get("incident") or {}
                sev = inc.get("severity", m.get("severity", ""))
                out.print(
                    f"{m.get('event_time', '')[:19]}  {inc.get('event', 'alert'):8} {m.get('stream', ''):12} "
                    f"{key}  {sev:8} score {m.get('score', 0):.3g} / {m.get('threshold', 0):.3g}  "
                    f"alerts {inc.get('alert_count', 1)}  {inc.get('message_id', '')}",
                    highlight=False,
                )
            except (ValueError, AttributeError, TypeError):
                out.print(f"{key}: {value[:200]!r}", highlight=False)
        if max_messages is not None and n >= max_messages:
            break


def _target(item_id: int, incident: bool) -> dict[str, int]:
    return {"incident_id": item_id} if incident else {"alert_id": item_id}


def _update(
    database_url: str | None, item_id: int, incident: bool, change: Callable[[AlertQueries, dict[str, int]], int]
) -> tuple[dict[str, Any], int]:
    """Apply an operator change (ack, label) to an alert or incident; return the row after it and rows hit."""
    with _queries(database_url) as queries:
        n = change(queries, _target(item_id, incident))
        return (queries.get_incident(item_id) if incident else queries.get_alert(item_id)), n


@alerts_app.command("ack")
def ack_cmd(
    item_id: Annotated[
        int, typer.Argument(metavar="ID", min=1, max=MAX_ROW_ID, help="alert id (or incident id with --incident)")
    ],
    incident: Annotated[bool, typer.Option("--incident", help="ID is an incident: ack it and its alerts")] = False,
    by: Annotated[str, typer.Option("--by", help="who acknowledges")] = "operator",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    database_url: DbOpt = None,
) -> None:
    """Acknowledge an alert (or a whole incident). The first acknowledgement stands: acking again changes only
    rows not acknowledged yet (an incident's alerts that came since)."""
    if not by.strip() or len(by) > 64:
        raise ConfigError(f"--by must be 1-64 characters (got {len(by)})")
    row, n = _update(database_url, item_id, incident, lambda queries, target: queries.ack(by=by, **target))
    if as_json:
        _print_json({"acked": _jsonable(row), "rows": n})
    elif n == 0:
        out.print(
            f"{'incident' if incident else 'alert'} {item_id} was already acknowledged by {row['acked_by']} at "
            f"{_jsonable(row)['acked_at']}; nothing changed",
            highlight=False,
        )
    else:
        out.print(f"acknowledged {'incident' if incident else 'alert'} {item_id} ({n} rows)")


@alerts_app.command("label")
def label_cmd(
    item_id: Annotated[
        int, typer.Argument(metavar="ID", min=1, max=MAX_ROW_ID, help="alert id (or incident id with --incident)")
    ],
    tp: Annotated[bool, typer.Option("--tp", help="a true positive (give --tp or --fp)")] = False,
    fp: Annotated[bool, typer.Option("--fp", help="a false positive")] = False,
    incident: Annotated[bool, typer.Option("--incident", help="ID is an incident: label it and its alerts")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    database_url: DbOpt = None,
    publish: Annotated[
        bool,
        typer.Option("--publish-label", help="payments: also send the label to the labels topic (terminal fraud risk)"),
    ] = False,
    fanout: Annotated[
        bool,
        typer.Option(
            "--fanout/--no-fanout",
            help="with --publish-label: to every partition (models with label_fanout) or only the customer's",
        ),
    ] = True,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap; default KAFKA_BOOTSTRAP")] = None,
) -> None:
    """Label an alert (or incident) a true or false positive. True positives are kept out of retraining
    data (AlertQueries.confirmed_anomalies / pipeline.alerts.feedback); with --publish-label the verdict on each
    payment also goes to the labels topic, where models reading label feedback pick it up."""
    if tp == fp:
        raise ConfigError("give one of --tp or --fp" + (", not both" if tp else ""))
    s = Settings()
    boot = bootstrap or s.kafka_bootstrap
    if publish and not boot:
        raise ConfigError("--publish-label: set --bootstrap or KAFKA_BOOTSTRAP")
    label = "tp" if tp else "fp"
    # what is to be published is read (and checked) first, so a label that cannot be sent changes nothing
    payments = _labelled_payments(database_url, item_id, incident, boot, s, label) if publish and boot else None
    row, n = _update(database_url, item_id, incident, lambda queries, target: queries.label(label, **target))
    published = None
    if payments is not None and boot:
        published = _send_labels(payments.to_send, tp, boot, s.labels_topic, s.topic_partitions, fanout)
        with _queries(database_url) as queries:  # after the broker acked: a failed send is sent again next time
            queries.mark_label_published([alert_id for _, _, alert_id in payments.to_send], label)
        published.update(already_sent=payments.already_sent, other_verdict_sent=payments.other_verdict_sent)
    if as_json:
        _print_json({"labeled": _jsonable(row), "rows": n, **({"published": published} if publish else {})})
        return
    said = f"labelled {'incident' if incident else 'alert'} {item_id} {label} ({n} rows)"
    if published is not None:
        said += f"; {published['labels']} label(s) sent to {s.labels_topic}"
        if published["already_sent"]:
            said += f"; {published['already_sent']} already sent with this verdict, not sent again"
        if published["other_verdict_sent"]:
            said += (
                f"; note: the other verdict sent earlier for {published['other_verdict_sent']} payment(s) still "
                "counts in its terminal's fraud rate until it decays (labels add up; none is retracted)"
            )
    out.print(said, highlight=False)


class LabelledPayments(NamedTuple):
    """What --publish-label sends: each payment to label (decoded, with its stream's entity field and its
    alert's id); how many already carry this verdict on the topic, and how many another one."""

    to_send: list[tuple[Any, str, int]]
    already_sent: int
    other_verdict_sent: int


def _labelled_payments(
    database_url: str | None, item_id: int, incident: bool, bootstrap: str, settings: Settings, label: str
) -> LabelledPayments:
    """Each labelled payment, read back from its source position and decoded as its stream declares it: the
    bundled `transactions` stream, or a transactions stream of the stream file (PIPELINE_STREAMS_FILE), whose
    entity and time fields may be named otherwise. A payment whose alert already had this verdict published is
    not sent again: labels add up in a terminal's fraud rate (a probe's repeated --tp counted twice)."""
    from pipeline.kafka.client import read_at

    decoders = _payment_decoders(settings)
    with _queries(database_url) as queries:
        sources = queries.alert_sources(**_target(item_id, incident))
    payments = [a for a in sources if a["stream"] in decoders]
    if not payments:
        streams = sorted({a["stream"] for a in sources})
        raise ConfigError(
            f"{'incident' if incident else 'alert'} {item_id} has no payment alerts to publish (its streams: "
            f"{', '.join(streams) or 'none'}; payment streams: {', '.join(sorted(decoders))}); nothing was labelled"
        )
    send = [a for a in payments if a["label_published"] != label]
    where = {a["id"]: (a["source_topic"], a["source_partition"], a["source_offset"]) for a in send}
    found = read_at(bootstrap, list(where.values())) if where else {}
    missing = [p for p in where.values() if p not in found]
    if missing:
        raise ConfigError(
            f"source records no longer in Kafka (retention?): {missing[:3]}; nothing was labelled or published"
        )
    to_send = [
        (decoders[a["stream"]].decode(found[where[a["id"]]].value), decoders[a["stream"]].entity_key, a["id"])
        for a in send
    ]
    other = sum(1 for a in payments if a["label_published"] not in (None, label))
    return LabelledPayments(to_send, len(payments) - len(send), other)


def _payment_decoders(settings: Settings) -> dict[str, StreamSpec[Any]]:
    """stream name -> its spec (`decode`, `entity_key`), for every payment stream the service can serve."""
    from pipeline.features.streams import TransactionStream
    from pipeline.streams.config import load_streams
    from pipeline.streams.decode import stream_spec

    if settings.streams_file is None:
        return {"transactions": TransactionStream()}
    declared = load_streams(settings.streams_file).streams
    return {s.name: stream_spec(s) for s in declared if s.kind == "transactions"}


def _send_labels(
    payments: list[tuple[Any, str, int]], is_fraud: bool, bootstrap: str, topic: str, partitions: int, fanout: bool
) -> dict[str, Any]:
    """The verdict on each payment to the labels topic (labelled now), its customer under its stream's name."""
    from pipeline.alerts.feedback import transaction_labels
    from pipeline.kafka.client import ensure_topics, make_producer, produce_labels

    if not payments:
        return {"labels": 0, "records": 0, "topic": topic}
    at = datetime.now(timezone.utc)
    by_key: dict[str, list[Any]] = {}
    for payment, entity_key, _ in payments:
        by_key.setdefault(entity_key, []).append(payment)
    ensure_topics(bootstrap, [topic], partitions)
    producer = make_producer(bootstrap)
    n_labels = records = 0
    try:
        for entity_key, group in by_key.items():
            labels = transaction_labels(group, is_fraud=is_fraud, labelled_at=at, entity_key=entity_key)
            records += produce_labels(producer, topic, labels, fanout=fanout, key_field=entity_key)
            n_labels += len(labels)
    finally:
        producer.close()
    return {"labels": n_labels, "records": records, "topic": topic}
