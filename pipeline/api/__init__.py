"""Read-only HTTP API over the alert database, the alerts page, health and Prometheus metrics."""

from pipeline.api.app import create_app

__all__ = ["create_app"]
