"""`pipeline run --metrics-port/--api-port` listen on 127.0.0.1 unless --host says otherwise (as `pipeline api`)."""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.service_helpers import start_processor, topic_env


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
    proc = start_processor(topic_env(topic_prefix, kafka_bootstrap, pg_url), *args, log_path=log)
    try:
        _wait_up(f"http://127.0.0.1:{mport}/metrics", proc, log)
        _wait_up(f"http://127.0.0.1:{aport}/healthz", proc, log)
        assert _bound_on_all_addresses(mport) is (host == "0.0.0.0")
        assert _bound_on_all_addresses(aport) is (host == "0.0.0.0")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
