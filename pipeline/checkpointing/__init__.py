"""Checkpoints: make outputs durable, then commit offsets."""

from pipeline.checkpointing.checkpoint import Checkpointer, PartitionPositions

__all__ = ["Checkpointer", "PartitionPositions"]
