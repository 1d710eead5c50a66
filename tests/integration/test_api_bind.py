"""`pipeline run --metrics-port/--api-port` listen on 127.0.0.1 unless --host says otherwise (as `pipeline api`)."""

from __future__ import annotations

import errno
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.alerts_seed import seed
from tests.service_helpers import start_processor, stop_processor, topic_env
from tests.sql_helpers import SqlTestStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bound_on_all_addresses(port: int) -> bool:
    """Linux: 127.0.0.2 is loopback too; binding it fails only if someone listens on 0.0.0.0:port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _wait_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"processor exited with {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} never answered\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("host", [None, "0.0.0.0"])
def test_metrics_and_api_bind_loopback_unless_told(
    kafka_bootstrap: str, pg_url: str, topic_prefix: str, tmp_path: Path, host: str | None
) -> None:
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not a loopback address here")
    mport, aport = _free_port(), _free_port()
    args = ["--metrics-port", str(mport), "--api-port", str(aport), "--idle-exit", "120"]
    if host is not None:
        args += ["--host", host]
    log = tmp_path / "run.log"
    # a run of its own: the shared schema may hold run `live` of another test's consumer group
    env = topic_env(topic_prefix, kafka_bootstrap, pg_url, run_id=f"bind-{topic_prefix}")
    proc = start_processor(env, *args, log_path=log)
    try:
        _wait_up(f"http://127.0.0.1:{mport}/metrics", proc, log)
        _wait_up(f"http://127.0.0.1:{aport}/healthz", proc, log)
        assert _bound_on_all_addresses(mport) is (host == "0.0.0.0")
        assert _bound_on_all_addresses(aport) is (host == "0.0.0.0")
    finally:
        stop_processor(proc)


def test_the_services_own_metrics_endpoint_reads_open_incidents_from_the_database(
    kafka_bootstrap: str, pg_store: SqlTestStore, topic_prefix: str, tmp_path: Path
) -> None:
    """A probe read `pipeline_open_incidents 0.0` on `pipeline run --metrics-port` with 46 open incidents in
    the database: the gauge was only set by the API's /metrics. It is now read from the database at scrape."""
    seed(pg_store, run_id="live")
    open_now = pg_store.lifecycle_stats("live")["open_incidents"]
    assert open_now > 0
    mport = _free_port()
    log = tmp_path / "run.log"
    env = topic_env(topic_prefix, kafka_bootstrap, pg_store.url)
    env["PIPELINE_GROUP_ID"] = "g"  # the seeded run's group: a run id belongs to one group
    proc = start_processor(env, "--metrics-port", str(mport), "--idle-exit", "120", log_path=log)
    try:
        url = f"http://127.0.0.1:{mport}/metrics"
        _wait_up(url, proc, log)
        deadline = time.monotonic() + 60
        while True:  # the endpoint is up before the service has built its database connection
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            if f"pipeline_open_incidents {float(open_now)}" in text:
                break
            assert time.monotonic() < deadline, [line for line in text.splitlines() if "incidents" in line]
            time.sleep(0.3)
        backlog = next(line for line in text.splitlines() if line.startswith("pipeline_alerts_outbox_unpublished "))
        assert float(backlog.split()[1]) >= 0.0
    finally:
        stop_processor(proc)


def test_lifecycle_gauges_read_once_per_scrape_and_read_nan_while_the_database_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from pipeline.errors import SinkError
    from pipeline.metrics import read_lifecycle_at_scrape

    registry = CollectorRegistry()
    gauges = (Gauge("t_open", "", registry=registry), Gauge("t_backlog", "", registry=registry))
    reads: list[int] = []
    down = False

    def read() -> dict[str, int]:
        reads.append(1)
        if down:
            raise SinkError("database unavailable")
        return {"open_incidents": 3, "outbox_unpublished": 7}

    read_lifecycle_at_scrape(read, ttl_s=60.0, gauges=gauges)
    text = generate_latest(registry).decode()
    assert "t_open 3.0" in text and "t_backlog 7.0" in text and len(reads) == 1
    down = True
    with caplog.at_level("WARNING", logger="pipeline.metrics"):
        for _ in range(5):  # five scrapes while the database is down: one notice (a probe saw one per scrape)
            read_lifecycle_at_scrape(read, ttl_s=0.0, gauges=gauges)
    text = generate_latest(registry).decode()
    assert "t_open NaN" in text and "t_backlog NaN" in text
    assert len([r for r in caplog.records if "outbox backlog unknown" in r.getMessage()]) <= 1


def test_a_metrics_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A probe: `pipeline run --metrics-port P` with P taken printed a 50-line traceback and exited 1
    (--api-port said one line and exited 2)."""
    import os
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "KAFKA_BOOTSTRAP": "127.0.0.1:1", "DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"}
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--metrics-port", str(port)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--metrics-port {port} on 127.0.0.1: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr
