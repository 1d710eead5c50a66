"""A declared stream's records through the wire rules of its kind (pipeline.features.streams).

Records keep the layout of their kind (sensors: `{entity, time, "values": {channel: float}}`); the stream
file only names the entity and time fields. Where those differ from the kind's wire names, the spec renames
the record before validation, so every other rule (and every dead-letter reason) stays the kind's.
"""

from __future__ import annotations

from typing import Any

from pipeline.features.streams import SensorStream, StreamIdentity, StreamSpec, TransactionStream, make_stream
from pipeline.streams.config import Stream


def identity(stream: Stream) -> StreamIdentity:
    return StreamIdentity(stream.name, stream.entity_key, stream.time_field)


def stream_spec(stream: Stream, max_message_bytes: int = 65536, card: dict[str, Any] | None = None) -> StreamSpec[Any]:
    """The kind's decoder for the declared stream. Without a model card: the declared channels (sensors) or
    the base layout (transactions). With the card of the model that serves the stream: the model's feature
    order (sensors; pipeline.streams.serving checks that the channels are the declared ones) or the
    model's layout (transactions: terminal context, label feedback)."""
    if card is None:
        if stream.kind == "sensors":
            return SensorStream(stream.channel_names, max_message_bytes, identity=identity(stream))
        return TransactionStream(max_message_bytes, identity=identity(stream))
    return make_stream(
        stream.kind,
        channels=card.get("feature_names", stream.channel_names),
        max_message_bytes=max_message_bytes,
        card=card,
        identity=identity(stream),
    )


class StreamDecoder:
    """Decodes a declared stream's records outside the service (training on a topic range)."""

    def __init__(self, stream: Stream, max_message_bytes: int = 65536) -> None:
        self.spec = stream_spec(stream, max_message_bytes)

    def decode(self, value: bytes | None) -> Any:
        """The decoded record (the kind's attributes), or DecodeError with the dead-letter reason."""
        return self.spec.decode(value)
