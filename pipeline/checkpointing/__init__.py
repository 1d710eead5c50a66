"""Checkpoints: make outputs durable, then commit offsets."""

from pipeline.checkpointing.checkpoint import Checkpointer
from pipeline.checkpointing.protocols import CheckpointStore, IncidentLoads, ProcessorStore, Relay, StateLoads

__all__ = ["CheckpointStore", "Checkpointer", "IncidentLoads", "ProcessorStore", "Relay", "StateLoads"]
