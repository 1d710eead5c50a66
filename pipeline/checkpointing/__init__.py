"""Checkpoints: make outputs durable, then commit offsets (the order: pipeline/checkpointing/checkpoint.py).

Imported lazily: the SQL layer and the API read the plain rows (rows.py) without loading the checkpointer.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.checkpointing.checkpoint import Checkpointer
    from pipeline.checkpointing.protocols import CheckpointStore, IncidentLoads, ProcessorStore, Relay, StateLoads

_HOME = {"Checkpointer": "pipeline.checkpointing.checkpoint"} | {
    name: "pipeline.checkpointing.protocols"
    for name in ("CheckpointStore", "IncidentLoads", "ProcessorStore", "Relay", "StateLoads")
}
__all__ = ["CheckpointStore", "Checkpointer", "IncidentLoads", "ProcessorStore", "Relay", "StateLoads"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'pipeline.checkpointing' has no attribute {name!r}")
