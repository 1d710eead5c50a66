"""`pipeline broker` stops when its Tansu process dies: it kept running with the port closed, without a word
(found by probing, 2026-12-01). The real command and the real broker binary."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.kafka.broker import free_port, wait_for_port


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_the_broker_command_exits_when_its_broker_process_dies() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port("127.0.0.1", port, 30)
        assert "Tansu broker listening" in proc.stdout.readline()  # type: ignore[union-attr]  # started
        (tansu,) = _children(proc.pid)
        os.kill(tansu, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.returncode == 1
        assert "the Tansu broker process exited" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # and closes the pipes


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux's setpriv sets the parent-death signal")
def test_a_broker_dies_with_the_command_that_started_it() -> None:
    """A kill -9 of `pipeline broker` (or of `pipeline run` on the embedded broker) left Tansu running."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "broker", "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_for_port("127.0.0.1", port, 30)
        assert "Tansu broker listening" in proc.stdout.readline()  # type: ignore[union-attr]
        (tansu,) = _children(proc.pid)
        proc.kill()
        proc.communicate(timeout=10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{tansu}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{tansu}").exists(), "the broker outlived its parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_the_broker_command_on_a_port_in_use_says_so() -> None:
    """A probe: `pipeline broker --port P` with P taken said the broker was listening (the other server
    answered the readiness wait), then "the Tansu broker process exited (code 0)"."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "broker", "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode != 0 and "listening" not in done.stdout, done.stdout + done.stderr
    assert f"127.0.0.1:{port} is in use" in done.stderr and "Traceback" not in done.stderr
