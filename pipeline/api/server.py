"""Run the API with uvicorn: in the foreground (`pipeline api`) or in a background thread (tests, and
`pipeline run --api-port` once wired)."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from pipeline.errors import PipelineError


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
    uvicorn.run(app, host=host, port=port, log_level="info")
