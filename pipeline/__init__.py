"""Streaming anomaly detection: Kafka -> decode/validate -> per-entity state -> batched LSTM-AE scoring
-> adaptive threshold -> alerts in SQL, with checkpoints that flush sinks before committing offsets.
"""

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.scoring import StreamScorer

__version__ = "0.1.0"
__all__ = ["PipelineError", "Settings", "StreamScorer", "__version__"]
