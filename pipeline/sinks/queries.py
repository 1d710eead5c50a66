"""What people read and change in the alert database, through the API and the `pipeline alerts` CLI: alerts,
incidents, score samples, operator feedback (ack, label) and the retraining exclusions. The processing core
never calls these; its reads and writes are pipeline.sinks.checkpoint_store."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, case, func, select, true, update

from pipeline.checkpointing.rows import iso_utc
from pipeline.errors import NotFoundError
from pipeline.sinks.database import Database
from pipeline.sinks.tables import RUN_TABLES, alert_outbox, alerts, incidents, partition_checkpoints, score_samples


class AlertQueries:
    def __init__(self, db: Database) -> None:
        self.db = db

    def list_alerts(
        self,
        *,
        run_id: str | None = None,
        entity_id: str | None = None,
        stream: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Oldest first."""
        q = _where_common(
            select(alerts).order_by(alerts.c.event_time, alerts.c.id),
            alerts,
            alerts.c.event_time,
            run_id=run_id,
            entity_id=entity_id,
            stream=stream,
            since=since,
        )
        if limit is not None:
            q = q.limit(limit)
        with self.db.reading("list alerts") as conn:
            return [dict(m) for m in conn.execute(q).mappings()]

    def query_alerts(
        self,
        *,
        run_id: str | None = None,
        entity_id: str | None = None,
        stream: str | None = None,
        since: datetime | None = None,
        status: str | None = None,
        incident_id: int | None = None,
        after_id: int | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """Newest event time first, with the incident's id and status. status: open|resolved (the incident's),
        acked|unacked, tp|fp|unlabeled. since: by event time. after_id: a poller's cursor, alerts stored
        after alert `after_id`, in the order they were stored (ascending id) instead: an event-time filter
        misses alerts of late events and of lagging partitions, whose event times are older than the last
        one a poller saw."""
        q = _alerts_with_incident()
        if after_id is None:
            q = q.order_by(alerts.c.event_time.desc(), alerts.c.id.desc())
        else:
            q = q.where(alerts.c.id > after_id).order_by(alerts.c.id)
        q = _where_common(
            q.limit(limit), alerts, alerts.c.event_time, run_id=run_id, entity_id=entity_id, stream=stream, since=since
        )
        if incident_id is not None:
            q = q.where(incidents.c.id == incident_id)
        if status is not None:
            q = q.where(_alert_status_filter(status))
        with self.db.reading("query alerts") as conn:
            return [dict(m) for m in conn.execute(q).mappings()]

    def peak_alert(self, incident_id: int) -> dict[str, Any] | None:
        """The incident's alert with the highest score / threshold (a threshold of 0 or less first): its
        peak, whatever the number of its alerts."""
        ratio = alerts.c.score / case((alerts.c.threshold > 0, alerts.c.threshold), else_=1.0)
        q = (
            _alerts_with_incident()
            .where(incidents.c.id == incident_id)
            .order_by((alerts.c.threshold <= 0).desc(), ratio.desc(), alerts.c.id)
            .limit(1)
        )
        with self.db.reading(f"read the peak alert of incident {incident_id}") as conn:
            row = conn.execute(q).mappings().first()
        return None if row is None else dict(row)

    def get_alert(self, alert_id: int) -> dict[str, Any]:
        with self.db.reading(f"read alert {alert_id}") as conn:
            row = conn.execute(select(alerts).where(alerts.c.id == alert_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"no alert with id {alert_id}")
        return dict(row)

    def list_incidents(
        self,
        *,
        run_id: str | None = None,
        status: str | None = None,
        entity_id: str | None = None,
        stream: str | None = None,
        since: datetime | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """Newest activity first."""
        q = select(incidents).order_by(incidents.c.last_alert_at.desc(), incidents.c.id.desc()).limit(limit)
        q = _where_common(
            q, incidents, incidents.c.last_alert_at, run_id=run_id, entity_id=entity_id, stream=stream, since=since
        )
        if status in ("open", "resolved"):
            q = q.where(incidents.c.status == status)
        elif status is not None:
            q = q.where(_ack_label_filter(incidents, status))
        with self.db.reading("list incidents") as conn:
            return [dict(m) for m in conn.execute(q).mappings()]

    def get_incident(self, incident_id: int) -> dict[str, Any]:
        with self.db.reading(f"read incident {incident_id}") as conn:
            row = conn.execute(select(incidents).where(incidents.c.id == incident_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"no incident with id {incident_id}")
        return dict(row)

    def recent_scores(
        self, run_id: str | None, stream: str | None, entity_id: str, limit: int = 500
    ) -> list[dict[str, Any]]:
        """The entity's newest score samples, oldest first."""
        q = select(score_samples).where(score_samples.c.entity_id == entity_id)
        if run_id is not None:
            q = q.where(score_samples.c.run_id == run_id)
        if stream is not None:
            q = q.where(score_samples.c.stream == stream)
        q = q.order_by(score_samples.c.id.desc()).limit(limit)
        with self.db.reading("read score samples") as conn:
            rows = [dict(m) for m in conn.execute(q).mappings()]
        rows.reverse()
        return rows

    # -- operator feedback ------------------------------------------------------------------------------
    def ack(self, *, alert_id: int | None = None, incident_id: int | None = None, by: str = "operator") -> int:
        """Acknowledge an alert, or an incident and all its alerts. Returns rows changed (alerts + incident).
        The first acknowledgement stands (who and when): rows already acknowledged are left as they are, so an
        incident acked again acks only its alerts that came since."""
        values = {"acked_at": datetime.now(timezone.utc), "acked_by": by[:64]}
        return self._feedback(alert_id, incident_id, values, only_unset="acked_at")

    def label(self, label: str, *, alert_id: int | None = None, incident_id: int | None = None) -> int:
        """Label an alert, or an incident and all its alerts, as a true (tp) or false (fp) positive."""
        if label not in ("tp", "fp"):
            raise ValueError("label must be 'tp' or 'fp'")
        return self._feedback(alert_id, incident_id, {"label": label}, {"labeled_at": datetime.now(timezone.utc)})

    def _feedback(
        self,
        alert_id: int | None,
        incident_id: int | None,
        values: dict[str, Any],
        alert_only: dict[str, Any] | None = None,
        only_unset: str | None = None,
    ) -> int:
        """only_unset: a column; rows where it is already set are left alone."""
        if (alert_id is None) == (incident_id is None):
            raise ValueError("give exactly one of alert_id, incident_id")

        def unset(table: Table) -> ColumnElement[bool]:
            return table.c[only_unset].is_(None) if only_unset is not None else true()

        with self.db.writing("store the operator's feedback") as conn:
            if alert_id is not None:
                if conn.execute(select(alerts.c.id).where(alerts.c.id == alert_id)).first() is None:
                    raise NotFoundError(f"no alert with id {alert_id}")
                change = update(alerts).where(alerts.c.id == alert_id, unset(alerts))
                return int(conn.execute(change.values(**values, **(alert_only or {}))).rowcount)
            key = conn.execute(select(incidents.c.incident_key).where(incidents.c.id == incident_id)).scalar()
            if key is None:
                raise NotFoundError(f"no incident with id {incident_id}")
            m = conn.execute(
                update(incidents).where(incidents.c.id == incident_id, unset(incidents)).values(**values)
            ).rowcount
            n = conn.execute(
                update(alerts).where(alerts.c.incident_key == key, unset(alerts)).values(**values, **(alert_only or {}))
            ).rowcount
            return int(m) + int(n)

    def alert_sources(self, *, alert_id: int | None = None, incident_id: int | None = None) -> list[dict[str, Any]]:
        """stream and source position (topic, partition, offset) of an alert, or of an incident's alerts, with the
        verdict last published for it (label_published); NotFoundError for an id that names none."""
        if (alert_id is None) == (incident_id is None):
            raise ValueError("give exactly one of alert_id, incident_id")
        cols = (
            alerts.c.id,
            alerts.c.stream,
            alerts.c.source_topic,
            alerts.c.source_partition,
            alerts.c.source_offset,
            alerts.c.label_published,
        )
        with self.db.reading("read alert sources") as conn:
            if alert_id is not None:
                rows = [dict(m) for m in conn.execute(select(*cols).where(alerts.c.id == alert_id)).mappings()]
                if not rows:
                    raise NotFoundError(f"no alert with id {alert_id}")
                return rows
            key = conn.execute(select(incidents.c.incident_key).where(incidents.c.id == incident_id)).scalar()
            if key is None:
                raise NotFoundError(f"no incident with id {incident_id}")
            q = select(*cols).where(alerts.c.incident_key == key).order_by(alerts.c.id)
            return [dict(m) for m in conn.execute(q).mappings()]

    def mark_label_published(self, alert_ids: list[int], label: str) -> None:
        """Record the verdict sent to the labels topic for these alerts' payments."""
        if not alert_ids:
            return
        with self.db.writing("record the published labels") as conn:
            conn.execute(update(alerts).where(alerts.c.id.in_(alert_ids)).values(label_published=label))

    def confirmed_anomalies(self, run_id: str | None = None, stream: str | None = None) -> list[dict[str, Any]]:
        """Alerts labelled true positive: the events to keep out of retraining data."""
        cols = (
            alerts.c.stream,
            alerts.c.entity_id,
            alerts.c.event_time,
            alerts.c.source_topic,
            alerts.c.source_partition,
            alerts.c.source_offset,
        )
        q = select(*cols).where(alerts.c.label == "tp").order_by(alerts.c.event_time)
        if run_id is not None:
            q = q.where(alerts.c.run_id == run_id)
        if stream is not None:
            q = q.where(alerts.c.stream == stream)
        with self.db.reading("read confirmed anomalies") as conn:
            return [dict(m) for m in conn.execute(q).mappings()]

    def lifecycle_stats(self, run_id: str | None = None) -> dict[str, int]:
        """Open incidents and unpublished alerts-topic messages (for /metrics)."""
        q1 = select(func.count()).select_from(incidents).where(incidents.c.status == "open")
        q2 = select(func.count()).select_from(alert_outbox).where(alert_outbox.c.published_at.is_(None))
        if run_id is not None:
            q1 = q1.where(incidents.c.run_id == run_id)
            q2 = q2.where(alert_outbox.c.run_id == run_id)
        with self.db.reading("read lifecycle stats") as conn:
            return {
                "open_incidents": int(conn.execute(q1).scalar_one()),
                "outbox_unpublished": int(conn.execute(q2).scalar_one()),
            }

    def outbox_rows(self, run_id: str | None = None, *, unpublished: bool = False) -> list[dict[str, Any]]:
        """Alerts-topic messages, oldest first."""
        q = select(alert_outbox).order_by(alert_outbox.c.id)
        if run_id is not None:
            q = q.where(alert_outbox.c.run_id == run_id)
        if unpublished:
            q = q.where(alert_outbox.c.published_at.is_(None))
        with self.db.reading("read the outbox") as conn:
            return [dict(m) for m in conn.execute(q).mappings()]

    def known_run(self, run_id: str) -> bool:
        """Whether a run wrote anything here: a checkpoint (every run that consumed, alerts or not) or an alert."""
        with self.db.reading(f"look up run {run_id!r}") as conn:
            for t in (partition_checkpoints, alerts):
                if conn.execute(select(t.c.run_id).where(t.c.run_id == run_id).limit(1)).first() is not None:
                    return True
        return False

    def delete_run(self, run_id: str) -> None:
        """Every row of one run, in every table (a replay's results, for one)."""
        with self.db.writing(f"delete run {run_id!r}") as conn:
            for t in RUN_TABLES:
                conn.execute(t.delete().where(t.c.run_id == run_id))


def row_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """A result row with datetimes as ISO-8601 UTC strings (SQLite hands back naive UTC datetimes)."""
    return {k: iso_utc(v) if isinstance(v, datetime) else v for k, v in row.items()}


def _ack_label_filter(table: Table, status: str) -> ColumnElement[bool]:
    c = table.c
    filters = {
        "acked": c.acked_at.is_not(None),
        "unacked": c.acked_at.is_(None),
        "tp": c.label == "tp",
        "fp": c.label == "fp",
        "unlabeled": c.label.is_(None),
    }
    if status not in filters:
        raise ValueError(f"unknown status {status!r}: open, resolved, {', '.join(filters)}")
    return filters[status]


def _alert_status_filter(status: str) -> ColumnElement[bool]:
    if status in ("open", "resolved"):
        return incidents.c.status == status
    return _ack_label_filter(alerts, status)


def _alerts_with_incident() -> Select[Any]:
    """Alert rows with their incident's id and status (the alerts the CLI and the API list)."""
    return select(alerts, incidents.c.id.label("incident_id"), incidents.c.status.label("incident_status")).select_from(
        alerts.outerjoin(incidents, incidents.c.incident_key == alerts.c.incident_key)
    )


def _where_common(
    q: Select[Any],
    table: Table,
    time_col: ColumnElement[datetime],
    *,
    run_id: str | None,
    entity_id: str | None,
    stream: str | None,
    since: datetime | None,
) -> Select[Any]:
    """The filters alerts and incidents share (CLI, API)."""
    for col, value in (("run_id", run_id), ("entity_id", entity_id), ("stream", stream)):
        if value is not None:
            q = q.where(table.c[col] == value)
    if since is not None:
        q = q.where(time_col >= since)
    return q
