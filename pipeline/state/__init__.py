"""Per-entity state: recent window, feature-scaling and score statistics, in flat numpy arrays."""

from pipeline.state.store import EntityStateStore, StateLayout

__all__ = ["EntityStateStore", "StateLayout"]
