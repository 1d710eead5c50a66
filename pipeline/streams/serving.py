"""The streams `pipeline run` serves: each declared stream with its model resolved (bundled, a checkpoint file or
the registry) and checked against the stream's channels before the service starts, so a model that does not
fit its stream is refused with the stream's name instead of scoring the wrong inputs.

The service (pipeline.app), the hot swap of promoted versions and shadow scoring resolve models here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from models.lstm_ae import Checkpoint, bundled_checkpoint_path
from models.lstm_forecast import ForecastCheckpoint, load_model
from pipeline.errors import ConfigError
from pipeline.features.streams import StreamSpec
from pipeline.registry.registry import RegistryError, channel_mismatch, checkpoint_from_bytes
from pipeline.streams.config import Stream, parse_model_ref
from pipeline.streams.decode import stream_spec

if TYPE_CHECKING:
    from pipeline.registry.registry import ModelRegistry


class ServedModel(NamedTuple):
    checkpoint: Checkpoint | ForecastCheckpoint
    version: str  # what alerts carry: the registry's version id (pumps-v3), else the card's version


def resolve_model(stream: Stream, registry: ModelRegistry | None, ref: str | None = None) -> ServedModel:
    """The model `ref` names (default: the stream's model; pass `stream.challenger` for its challenger), loaded
    and checked against the stream's channels. registry: None where the service has no database to ask (a
    registry reference is then a ConfigError). A checkpoint from the registry reports the registry's version id
    as its version, so the scorer, its alerts and its log lines name what the operator promoted."""
    text = ref or stream.model
    model_ref = parse_model_ref(text)
    where = f"stream {stream.name!r}: model {text}"
    if model_ref.source == "registry":
        if registry is None:
            raise ConfigError(f"{where} comes from the model registry, which lives in the database: set DATABASE_URL")
        try:
            resolved = registry.resolve(model_ref.registry_ref)
            version = resolved.model.version
            checkpoint = served_as(checkpoint_from_bytes(resolved.blob, version), version)
        except RegistryError as exc:  # names the reference or the version
            raise ConfigError(f"stream {stream.name!r}: {exc}") from None
    else:
        path = bundled_checkpoint_path(model_ref.name) if model_ref.source == "bundled" else Path(model_ref.name)
        try:
            checkpoint = load_model(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line refusal
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{where}: cannot load {path}: {first}") from None
        version = checkpoint.version
    check_channels(stream, checkpoint.card, checkpoint.config.scored(), version)
    return ServedModel(checkpoint, version)


def served_as(checkpoint: Checkpoint | ForecastCheckpoint, version: str) -> Checkpoint | ForecastCheckpoint:
    """The checkpoint reporting `version` (the card's own version stays as card_version)."""
    card = {**checkpoint.card, "version": version, "card_version": checkpoint.version}
    return replace(checkpoint, card=card)


def check_channels(stream: Stream, card: dict[str, Any], scored: list[int], version: str) -> None:
    """A sensors model must read exactly the declared channels (in any order: the decoder picks them by the
    model's feature names) and score exactly the `scored` ones; a transactions model's layout must be one this
    build serves, and the declared channels (if any) must be its features. ConfigError naming both sides."""
    features = [str(f) for f in card.get("feature_names") or ()]
    if not features:
        raise ConfigError(f"stream {stream.name!r}: model {version} names no channels in its card (feature_names)")
    declared = stream.channel_names
    if stream.kind == "transactions" and not declared:
        declared = features  # the transactions model decides its layout; spec() refuses one this build lacks
    mismatch = channel_mismatch(features, declared)
    if mismatch is None and stream.kind == "transactions" and features != declared:
        mismatch = "the same features in another order"
    if mismatch is not None:
        raise ConfigError(
            f"stream {stream.name!r} cannot be served by model {version}: the model reads {', '.join(features)}; "
            f"the stream declares {', '.join(declared)} ({mismatch})"
        )
    if stream.kind == "sensors":
        model_scores = sorted(features[i] for i in scored)
        if model_scores != sorted(stream.scored_channels):
            raise ConfigError(
                f"stream {stream.name!r} cannot be served by model {version}: the model scores "
                f"{', '.join(model_scores)}; the stream's scored channels are {', '.join(stream.scored_channels)}"
            )


@dataclass(frozen=True)
class ServedStream:
    """A declared stream and the model that serves it (resolve_model checked that they fit)."""

    stream: Stream
    model: ServedModel

    def spec(self, max_message_bytes: int = 65536) -> StreamSpec[Any]:
        """The stream's decoder and features in the model's layout, named as the stream file names it."""
        try:
            return stream_spec(self.stream, max_message_bytes, self.model.checkpoint.card)
        except ValueError as exc:
            raise ConfigError(f"stream {self.stream.name!r}: model {self.model.version}: {exc}") from None


def serve(streams: list[Stream], registry: ModelRegistry | None) -> list[ServedStream]:
    """Every stream with its model, resolved in file order; the first that cannot be served is a ConfigError."""
    return [ServedStream(s, resolve_model(s, registry)) for s in streams]
