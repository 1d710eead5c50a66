"""Durable outputs. The only package that imports SQLAlchemy."""

from pipeline.sinks.sql import AlertRow, SqlStore

__all__ = ["AlertRow", "SqlStore"]
