"""Shared fixtures. Real services only: the Tansu broker (or KAFKA_BOOTSTRAP) and the PostgreSQL server
(TEST_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/test). Each fixture skips with the
reason when its service cannot be had."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import BrokerError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in ("unit", "integration", "e2e"):
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A broker for the whole session: KAFKA_BOOTSTRAP if set, else an embedded Tansu broker."""
    explicit = os.environ.get("KAFKA_BOOTSTRAP")
    if explicit:
        yield explicit
        return
    from pipeline.kafka.broker import TansuBroker

    try:
        broker = TansuBroker().start()
    except BrokerError as exc:
        pytest.skip(f"no Kafka broker: {exc}")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture()
def fresh_broker() -> Iterator[object]:
    """A private Tansu broker (tests that restart or kill the broker)."""
    from pipeline.kafka.broker import TansuBroker

    try:
        broker = TansuBroker().start()
    except BrokerError as exc:
        pytest.skip(f"cannot start Tansu: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture()
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A private schema on the PostgreSQL server for this test session (parallel sessions don't collide)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    schema = f"pytest_{uuid.uuid4().hex[:12]}"
    try:
        eng = create_engine(PG_URL)
        with eng.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc.orig}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with eng.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        eng.dispose()


@pytest.fixture()
def pg_store(pg_url: str) -> Iterator[object]:
    """A SqlTestStore on PostgreSQL with a freshly created schema."""
    from tests.sql_helpers import SqlTestStore

    store = SqlTestStore(pg_url)
    _reset(store)
    try:
        yield store
    finally:
        store.dispose()


@pytest.fixture()
def sqlite_store(tmp_path: Path) -> Iterator[object]:
    from tests.sql_helpers import SqlTestStore

    store = SqlTestStore(f"sqlite:///{tmp_path / 'alerts.db'}")
    store.create_schema()
    try:
        yield store
    finally:
        store.dispose()


def _reset(store: object) -> None:
    from sqlalchemy import text

    eng = store.engine  # type: ignore[attr-defined]
    with eng.begin() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar_one()
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    store.create_schema()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[str]:
    """Real Apache Kafka: KAFKA_BOOTSTRAP if set, else a testcontainers broker where a Docker engine runs."""
    explicit = os.environ.get("KAFKA_BOOTSTRAP")
    if explicit:
        yield explicit
        return
    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no engine here
        pytest.skip(f"no Docker engine for a testcontainers Kafka ({type(exc).__name__}); set KAFKA_BOOTSTRAP to run")
    try:
        from testcontainers.kafka import KafkaContainer
    except ImportError:
        from testcontainers.community.kafka import KafkaContainer  # type: ignore[no-redef]
    with KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft() as kafka:
        yield kafka.get_bootstrap_server()
