"""Decode/validate wire records and turn them into feature vectors, per stream."""

from pipeline.features.streams import (
    EventColumns,
    SensorStream,
    StreamSpec,
    TransactionStream,
    make_stream,
)

__all__ = ["EventColumns", "SensorStream", "StreamSpec", "TransactionStream", "make_stream"]
