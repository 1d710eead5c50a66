"""Batched scoring of entity windows with an LSTM autoencoder, plus adaptive per-entity thresholds."""

from pipeline.scoring.scorer import ScoreBatch, StreamScorer, select_device
from pipeline.scoring.threshold import AdaptiveThreshold

__all__ = ["AdaptiveThreshold", "ScoreBatch", "StreamScorer", "select_device"]
