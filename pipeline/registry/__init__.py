"""Model versions per stream (champion, challenger, history), drift against the model card, and the
champion/challenger comparison. The SQL side is pipeline.sinks.registry."""

from pipeline.registry.registry import ModelRegistry, RegistryError

__all__ = ["ModelRegistry", "RegistryError"]
