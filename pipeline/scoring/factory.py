"""One stream's scorer from what that stream needs, without Settings: the service (pipeline.app), replay and
bench build their scorers here, so they score exactly alike."""

from __future__ import annotations

from collections.abc import Sequence

from models.lstm_ae import Checkpoint
from models.lstm_forecast import ForecastCheckpoint
from pipeline.errors import ConfigError
from pipeline.features.streams import StreamSpec, make_stream
from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.scoring.scorer import StreamScorer
from pipeline.scoring.threshold import AdaptiveThreshold


def build_scorer(
    stream: str | StreamSpec,
    checkpoint: Checkpoint | ForecastCheckpoint,
    *,
    channels: Sequence[str] = (),
    knobs: ThresholdKnobs = ThresholdKnobs(),
    device: str = "cpu",
    precision: str | None = None,
    allowed_lateness_s: float | None = None,
    context_gap_s: float | None = None,
    max_message_bytes: int = 65536,
) -> StreamScorer:
    """stream: a spec, or a stream kind ("transactions", "sensors") whose spec follows the checkpoint's card
    (its feature names; `channels` only where the card names none). The adaptive threshold starts from the
    checkpoint's calibrated global threshold. A card naming features this build cannot produce is a ConfigError."""
    if isinstance(stream, StreamSpec):
        spec = stream
    else:
        try:
            spec = make_stream(
                stream,
                channels=checkpoint.card.get("feature_names", channels),
                max_message_bytes=max_message_bytes,
                card=checkpoint.card,
            )
        except ValueError as exc:
            raise ConfigError(f"{stream} model {checkpoint.version}: {exc}") from None
    try:  # the card's knobs (its family's, chosen on validation) unless the configuration sets its own
        knobs = ThresholdKnobs.served(knobs, checkpoint.card.get("threshold_knobs"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{spec.name} model {checkpoint.version}: threshold knobs: {exc}") from None
    forecaster = checkpoint if isinstance(checkpoint, ForecastCheckpoint) else None
    young = forecaster.young_threshold if forecaster else None
    return StreamScorer(
        spec,
        checkpoint,
        # a forecaster's young entities: the threshold its card calibrated on early-life errors
        threshold=AdaptiveThreshold(checkpoint.threshold, knobs, young_threshold=young),
        # a forecaster's first predictions for an entity come from a state that has not seen it yet
        min_history=max(knobs.min_history, forecaster.burn_in) if forecaster else knobs.min_history,
        device=device,
        precision=precision,
        allowed_lateness_s=allowed_lateness_s,
        context_gap_s=context_gap_s,
    )
