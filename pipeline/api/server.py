"""Run the API with uvicorn: in the foreground (`pipeline api`) or in a background thread (tests, and
`pipeline run --api-port` once wired)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from pipeline.errors import ConfigError, PipelineError


class ApiServer:
    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, name="api", daemon=True)
        self.url = f"http://{host}:{port}"

    def start(self, timeout_s: float = 10.0) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise PipelineError(f"API server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def serve(app: Any, host: str, port: int) -> None:
    check_listen(host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")


def check_listen(host: str, port: int) -> None:
    """One line (exit 2) when the address cannot be listened on, instead of uvicorn's startup log and exit 3."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
