"""Streaming anomaly detection: Kafka -> decode/validate -> per-entity state -> batched LSTM-AE scoring
-> adaptive threshold -> alerts in SQL, with checkpoints that flush sinks before committing offsets.

`StreamScorer` is imported lazily: `import pipeline` (and so `pipeline --help`, `pipeline alerts`, the API)
must not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.config import Settings
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.scoring.scorer import StreamScorer

__version__ = "0.1.0"
__all__ = ["PipelineError", "Settings", "StreamScorer", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "StreamScorer":
        from pipeline.scoring.scorer import StreamScorer

        return StreamScorer
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
