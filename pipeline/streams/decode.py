"""A declared stream's records through the wire rules of its kind (pipeline.features.streams).

Records keep the layout of their kind (sensors: `{entity, time, "values": {channel: float}}`); the stream
file only names the entity and time fields. Where those differ from the kind's wire names, the record is
renamed before validation, so every other rule (and every dead-letter reason) stays the kind's.
"""

from __future__ import annotations

from typing import Any

import orjson

from pipeline.errors import DecodeError
from pipeline.features.streams import SensorStream, StreamSpec, TransactionStream, duplicate_key
from pipeline.streams.config import Stream

WIRE_TIME_FIELD = "timestamp"


def stream_spec(stream: Stream, max_message_bytes: int = 65536) -> StreamSpec[Any]:
    """The kind's decoder for the declared channels. Transactions: the base layout; the served layout
    (terminal context, label feedback) comes from the model card (app.build_scorers)."""
    if stream.kind == "sensors":
        return SensorStream(stream.channel_names, max_message_bytes)
    return TransactionStream(max_message_bytes)


class StreamDecoder:
    def __init__(self, stream: Stream, max_message_bytes: int = 65536) -> None:
        self.spec = stream_spec(stream, max_message_bytes)
        wanted = {stream.entity_key: self.spec.entity_field, stream.time_field: WIRE_TIME_FIELD}
        self.renames = {ours: wire for ours, wire in wanted.items() if ours != wire}

    def decode(self, value: bytes | None) -> Any:
        """The decoded record (the kind's attributes), or DecodeError with the dead-letter reason."""
        if not self.renames or value is None or len(value) > self.spec.max_message_bytes:
            return self.spec.decode(value)
        dup = duplicate_key(value)
        if dup is not None:
            raise DecodeError("duplicate_key", f"key {dup[:80]!r} occurs twice in one object")
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise DecodeError("malformed_json", str(exc)) from None
        if not isinstance(obj, dict):
            raise DecodeError("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
        for ours, wire in self.renames.items():
            if wire in obj:
                raise DecodeError("schema_violation", f"{wire}: unexpected field (this stream's field is {ours!r})")
            if ours in obj:
                obj[wire] = obj.pop(ours)
        return self.spec.parse(obj)
