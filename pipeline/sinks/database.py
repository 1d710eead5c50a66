"""One SQL database (SQLite or PostgreSQL): the engine, its schema (Alembic migrations) and connections whose
SQLAlchemy errors become SinkError, so a database outage reaches the caller as one pipeline error that
names what failed, never as a driver traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError, SQLAlchemyError

from pipeline.errors import SinkError
from pipeline.sinks.tables import metadata


class Database:
    def __init__(self, url: str, *, echo: bool = False, existing: bool = False) -> None:
        """existing: the commands that only read (or label) what a service wrote refuse a SQLite file that is
        not there, instead of creating an empty database at a mistyped path and reporting nothing in it."""
        self.url = url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            path = Path(url.removeprefix("sqlite:///"))
            if existing and not path.is_file():
                raise SinkError(
                    f"no database at {path}: nothing has written there yet (`pipeline run` creates it); "
                    "check --database-url / DATABASE_URL"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: an error names the statement, never the row's values (entity ids, amounts) in logs
        kwargs: dict[str, Any] = {"echo": echo, "future": True, "hide_parameters": True}
        if url.startswith("postgresql"):
            kwargs.update(pool_pre_ping=True, pool_size=4, max_overflow=4)
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except ArgumentError:
            hint = " (a postgres:// URL, as some platforms hand out: write postgresql+psycopg2://)"
            raise SinkError(
                "the database URL is not a SQLAlchemy URL (expected e.g. sqlite:///var/pipeline.db or "
                f"postgresql+psycopg2://user@host:5432/db){hint if url.startswith('postgres://') else ''}"
            ) from None
        except ModuleNotFoundError as exc:
            shown = make_url(url).render_as_string(hide_password=True)
            raise SinkError(
                f"database URL {shown}: its driver {exc.name!r} is not installed (PostgreSQL: "
                "postgresql+psycopg2://..., the driver this package installs)"
            ) from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def create_schema(self) -> None:
        """Bring the schema to head with the Alembic migrations. Never `create_all`: a database made that way
        is stamped at 0001 by the next start and its later migrations then fail."""
        try:
            from pipeline.sinks.migrations import upgrade_to_head  # Alembic: only when a schema is made

            upgrade_to_head(self.engine)
        except OperationalError as exc:  # unreachable or refusing: one line for the operator, not a traceback
            url = self.engine.url.render_as_string(hide_password=True)
            raise SinkError(f"cannot reach the database {url}: {str(exc.orig or exc).strip().splitlines()[0]}") from exc
        except DatabaseError as exc:  # e.g. a SQLite path naming a file that is not a database
            url = self.engine.url.render_as_string(hide_password=True)
            raise SinkError(f"cannot use the database {url}: {str(exc.orig or exc).strip().splitlines()[0]}") from exc

    def drop_schema(self) -> None:
        metadata.drop_all(self.engine)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except SQLAlchemyError:
            return False

    @contextmanager
    def reading(self, what: str) -> Iterator[Connection]:
        """A connection for reads; a SQLAlchemy error inside becomes SinkError("could not <what>: <cause>")."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise _sink_error(what, exc) from exc

    @contextmanager
    def writing(self, what: str) -> Iterator[Connection]:
        """One transaction, committed when the block ends; a SQLAlchemy error inside rolls it back and
        becomes SinkError("could not <what>: <cause>")."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise _sink_error(what, exc) from exc

    def dispose(self) -> None:
        self.engine.dispose()


def _sink_error(what: str, exc: SQLAlchemyError) -> SinkError:
    """An outage says so in one line (the driver's message); any other error keeps SQLAlchemy's full text."""
    if isinstance(exc, OperationalError):
        return SinkError(f"could not {what}: database unavailable: {exc.orig!s}".strip())
    return SinkError(f"could not {what}: {exc!s}")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
