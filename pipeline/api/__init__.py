"""Read-only HTTP API over the alert database, the alerts page, health and Prometheus metrics.

`create_app` is imported on first use, so `pipeline --help` (which registers `pipeline api`) works without
the `api` extra (fastapi, uvicorn)."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from pipeline.api.app import create_app

        return create_app
    raise AttributeError(name)
