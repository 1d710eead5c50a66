"""The model registry's tables and `SqlRegistryStore`, the SQL side of pipeline.registry.RegistryStore; plus
the reads of `pipeline models drift|compare`: alerts and shadow alerts by model version, score samples by
version.

Tables (migration 0004):
- model_versions: one row per version, the checkpoint file's bytes included (models are a few MB at most), so
  every replica of the service sees the same versions. (stream, content_hash) is unique: registering the same
  file twice gives the same version.
- model_aliases: stream@champion / stream@challenger -> version; a version that an alias names cannot be
  deleted (foreign key). `generation` is the id of the promotion row that set it.
- model_promotions: append-only history of every alias change; its newest id is the registry's generation.
- model_version_numbers (migration 0007): the last number given out per stream, so a deleted version's id is
  never given to another model (its alerts and samples would be credited to that model).
- shadow_alerts: the challenger's would-be alerts, the columns of `alerts`; they never open incidents.
- model_score_samples: a sample of every scored event's score per model version (champion and challenger),
  the live score distribution for drift and compare. (score_samples holds only the scores of entities with an
  incident, far from the distribution the card describes.)
The last two hold rows of a run, which the processor writes in its checkpoints: they live in
pipeline.sinks.tables (RUN_TABLES).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Select,
    Table,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from pipeline.errors import SinkError
from pipeline.registry.registry import (
    AliasMove,
    AliasState,
    ModelVersion,
    NewVersion,
    Promotion,
    RegistryConflict,
    RegistryError,
)
from pipeline.sinks.database import Database
from pipeline.sinks.tables import (
    alerts,
    model_aliases,
    model_promotions,
    model_score_samples,
    model_version_numbers,
    model_versions,
    shadow_alerts,
)

ADD_VERSION_TRIES = 5  # concurrent registrations of one stream race for the next number; the loser retries

_VERSION_COLS = tuple(c for c in model_versions.c if c.name not in ("id", "number", "blob"))


class SqlRegistryStore:
    """pipeline.registry.RegistryStore on the alert database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    def connect(cls, database_url: str, *, existing: bool = False) -> SqlRegistryStore:
        """A store on `database_url`, its schema brought to head (the registry tables come with 0004).
        existing: refuse a SQLite file that is not there (see Database)."""
        db = Database(database_url, existing=existing)
        db.create_schema()
        return cls(db)

    def dispose(self) -> None:
        self.db.dispose()

    # -- versions ---------------------------------------------------------------------------------------
    def add_version(self, new: NewVersion) -> tuple[ModelVersion, bool]:
        for _ in range(ADD_VERSION_TRIES):
            try:
                with self.db.engine.begin() as conn:
                    existing = conn.execute(
                        select(*_VERSION_COLS).where(
                            model_versions.c.stream == new.stream, model_versions.c.content_hash == new.content_hash
                        )
                    ).first()
                    if existing is not None:
                        return _version(existing), False
                    registered = conn.execute(
                        select(func.max(model_versions.c.number)).where(model_versions.c.stream == new.stream)
                    ).scalar()
                    given = conn.execute(
                        select(model_version_numbers.c.last_number).where(model_version_numbers.c.stream == new.stream)
                    ).scalar()
                    number = max(int(registered or 0), int(given or 0)) + 1  # deleted numbers stay taken
                    counter = {"stream": new.stream, "last_number": number}
                    if given is None:
                        conn.execute(insert(model_version_numbers), counter)
                    else:
                        conn.execute(
                            update(model_version_numbers)
                            .where(model_version_numbers.c.stream == new.stream)
                            .values(last_number=number)
                        )
                    row = {
                        "version": f"{new.stream}-v{number}",
                        "stream": new.stream,
                        "number": number,
                        "family": new.family,
                        "created_at": datetime.now(timezone.utc),
                        "content_hash": new.content_hash,
                        "card": new.card,
                        "blob": new.blob,
                        "size": len(new.blob),
                    }
                    conn.execute(insert(model_versions), row)
                    return _version(row), True
            except IntegrityError:
                continue  # another registration took the number (or the same file): look again
            except SQLAlchemyError as exc:
                raise _sink_error("register a model version", exc) from exc
        raise RegistryConflict(f"could not allocate a version of {new.stream!r}: too many concurrent registrations")

    def get_version(self, version: str) -> ModelVersion | None:
        with self.db.reading("read a model version") as conn:
            row = conn.execute(select(*_VERSION_COLS).where(model_versions.c.version == version)).first()
        return None if row is None else _version(row)

    def get_blob(self, version: str) -> bytes | None:
        with self.db.reading("read a model's weights") as conn:
            blob = conn.execute(select(model_versions.c.blob).where(model_versions.c.version == version)).scalar()
        return None if blob is None else bytes(blob)

    def list_versions(self, stream: str | None) -> list[ModelVersion]:
        q = select(*_VERSION_COLS).order_by(model_versions.c.stream, model_versions.c.number)
        if stream is not None:
            q = q.where(model_versions.c.stream == stream)
        with self.db.reading("list model versions") as conn:
            return [_version(r) for r in conn.execute(q)]

    def delete_version(self, version: str) -> bool:
        try:
            with self.db.engine.begin() as conn:
                return bool(conn.execute(delete(model_versions).where(model_versions.c.version == version)).rowcount)
        except IntegrityError:  # an alias was pointed at it meanwhile: the foreign key keeps it
            raise RegistryError(
                f"{version} is in use by an alias: promote or roll back another version first"
            ) from None
        except SQLAlchemyError as exc:
            raise _sink_error("delete a model version", exc) from exc

    # -- aliases ----------------------------------------------------------------------------------------
    def alias(self, stream: str, alias: str) -> AliasState | None:
        q = select(model_aliases).where(model_aliases.c.stream == stream, model_aliases.c.alias == alias)
        with self.db.reading("read a model alias") as conn:
            row = conn.execute(q).first()
        return None if row is None else _alias(row)

    def aliases(self, stream: str | None = None) -> list[AliasState]:
        q = select(model_aliases).order_by(model_aliases.c.stream, model_aliases.c.alias)
        if stream is not None:
            q = q.where(model_aliases.c.stream == stream)
        with self.db.reading("read model aliases") as conn:
            return [_alias(r) for r in conn.execute(q)]

    def aliases_of(self, version: str) -> list[AliasState]:
        q = select(model_aliases).where(model_aliases.c.version == version).order_by(model_aliases.c.stream)
        with self.db.reading("read model aliases") as conn:
            return [_alias(r) for r in conn.execute(q)]

    def generation(self) -> int:
        with self.db.reading("read the registry generation") as conn:
            return int(conn.execute(select(func.max(model_promotions.c.id))).scalar() or 0)

    def history(self, stream: str, alias: str) -> list[Promotion]:
        q = (
            select(model_promotions)
            .where(model_promotions.c.stream == stream, model_promotions.c.alias == alias)
            .order_by(model_promotions.c.id)
        )
        with self.db.reading("read the promotion history") as conn:
            return [Promotion(**r._mapping) for r in conn.execute(q)]

    def move_aliases(self, moves: Sequence[AliasMove], by: str) -> int:
        now = datetime.now(timezone.utc)
        generation = 0
        try:
            with self.db.engine.begin() as conn:
                for m in moves:
                    generation = self._move(conn, m, by[:64], now)
        except IntegrityError as exc:  # the version was deleted meanwhile, or a concurrent first promotion
            raise RegistryConflict(
                f"the registry changed meanwhile, nothing was changed: try again ({exc.orig})"
            ) from None
        except SQLAlchemyError as exc:
            raise _sink_error("move a model alias", exc) from exc
        return generation

    def _move(self, conn: Connection, m: AliasMove, by: str, now: datetime) -> int:
        key = (model_aliases.c.stream == m.stream, model_aliases.c.alias == m.alias)
        generation = int(
            conn.execute(
                insert(model_promotions).returning(model_promotions.c.id),
                {
                    "stream": m.stream,
                    "alias": m.alias,
                    "action": m.action,
                    "version": m.version,
                    "previous_version": m.expected,
                    "at": now,
                    "by": by,
                },
            ).scalar_one()
        )
        values = {"version": m.version, "generation": generation, "updated_at": now}
        if m.expected is None:  # the alias's first version (a clear always names the version it removes)
            conn.execute(insert(model_aliases), {"stream": m.stream, "alias": m.alias, **values})
            return generation
        stmt = (
            delete(model_aliases).where(*key, model_aliases.c.version == m.expected)
            if m.version is None
            else update(model_aliases).where(*key, model_aliases.c.version == m.expected).values(**values)
        )
        if conn.execute(stmt).rowcount != 1:
            raise RegistryConflict(
                f"{m.stream}@{m.alias} no longer points at {m.expected}: nothing was changed, try again"
            )
        return generation

    # -- what drift and compare read --------------------------------------------------------------------
    def version_alerts(
        self,
        version: str,
        *,
        shadow: bool,
        stream: str | None = None,
        since: datetime | None = None,
        run_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Alerts (shadow=True: the shadow alerts) a version raised: entity, source position, label, time."""
        table = shadow_alerts if shadow else alerts
        c = table.c
        q = _of_version(
            select(c.entity_id, c.source_topic, c.source_partition, c.source_offset, c.label, c.event_time),
            table,
            version,
            stream=stream,
            since=since,
            run_id=run_id,
        )
        with self.db.reading("read alerts by model version") as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(c.event_time))]

    def last_scored(self, version: str, *, stream: str | None = None, run_id: str | None = None) -> datetime | None:
        """The event time of a version's newest score sample: where the range it scored ends."""
        c = model_score_samples.c
        q = _of_version(select(func.max(c.event_time)), model_score_samples, version, stream=stream, run_id=run_id)
        with self.db.reading("read score samples by model version") as conn:
            return conn.execute(q).scalar()

    def version_scores(
        self,
        version: str,
        *,
        stream: str | None = None,
        since: datetime | None = None,
        run_id: str | None = None,
        limit: int = 200_000,
    ) -> list[float]:
        """The newest `limit` score samples of a version."""
        c = model_score_samples.c
        q = _of_version(select(c.score), model_score_samples, version, stream=stream, since=since, run_id=run_id)
        with self.db.reading("read score samples by model version") as conn:
            return [float(s) for s in conn.execute(q.order_by(c.id.desc()).limit(limit)).scalars()]


def _of_version(
    q: Select[Any],
    table: Table,
    version: str,
    *,
    stream: str | None = None,
    since: datetime | None = None,
    run_id: str | None = None,
) -> Select[Any]:
    """`q` restricted to a version's rows of `table` (alerts, shadow alerts, score samples), and to a stream,
    an event-time start and a run where given: the one scope drift and compare read by."""
    c = table.c
    q = q.where(c.model_version == version)
    if stream is not None:
        q = q.where(c.stream == stream)
    if since is not None:
        q = q.where(c.event_time >= since)
    if run_id is not None:
        q = q.where(c.run_id == run_id)
    return q


def _version(row: Row[Any] | dict[str, Any]) -> ModelVersion:
    m = row if isinstance(row, dict) else row._mapping
    return ModelVersion(
        version=m["version"],
        stream=m["stream"],
        family=m["family"],
        created_at=_utc(m["created_at"]),
        content_hash=m["content_hash"],
        size=int(m["size"]),
        card=dict(m["card"]),
    )


def _alias(row: Row[Any]) -> AliasState:
    m = row._mapping
    return AliasState(m["stream"], m["alias"], m["version"], int(m["generation"]), _utc(m["updated_at"]))


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _sink_error(what: str, exc: SQLAlchemyError) -> SinkError:
    if isinstance(exc, OperationalError):
        return SinkError(f"{what}: database unavailable: {exc.orig!s}".strip())
    return SinkError(f"{what}: {exc!s}")
