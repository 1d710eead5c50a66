"""Durable outputs. The only package that imports SQLAlchemy."""

from pipeline.sinks.sql import SqlStore

__all__ = ["SqlStore"]
