"""Decode stage: raw bytes -> a validated record of the stream, or a dead letter with the reason."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from pipeline.errors import DecodeError, PipelineError
from pipeline.features.streams import R, StreamSpec
from pipeline.processing.dead_letters import DeadLetters
from pipeline.records import RawRecord


def validate(spec: StreamSpec[R], r: RawRecord) -> R:
    """The validated record; DecodeError (with the dead-letter reason) for bad bytes or a key that is not
    the record's entity (state locality depends on entity-keyed partitions: an unkeyed record lands on any
    partition, so it is refused as missing_key)."""
    rec = spec.decode(require_key(spec, r))
    check_key(spec, r, rec)
    return rec


def require_key(spec: StreamSpec[R], r: RawRecord) -> bytes | None:
    """The record's value, if the record has a key."""
    if r.key is None:
        raise DecodeError("missing_key", f"records must be keyed by {spec.entity_key}")
    return r.value


def check_key(spec: StreamSpec[R], r: RawRecord, rec: R) -> None:
    if r.key is None or r.key.decode("utf-8", "replace") != spec.entity_of(rec):
        raise DecodeError("key_mismatch", f"key {(r.key or b'')[:80]!r} != {spec.entity_key}")


def decode(spec: StreamSpec[R], r: RawRecord, dead: DeadLetters) -> R | None:
    """The validated record, or None after dead-lettering it. Any error, not only a DecodeError, dead-letters
    this record alone (processing_error, with the stage)."""
    stage = "decode"
    try:
        rec = spec.decode(require_key(spec, r))
        stage = "key"
        check_key(spec, r, rec)
        return rec
    except DecodeError as exc:
        dead.send(r, exc.reason, exc.detail)
    except PipelineError:
        raise  # raised on purpose for the operator (state, database, stop): not one record's fault
    except Exception as exc:  # noqa: BLE001 - one record must never stop the service
        dead.processing_error(r, stage, exc)
    return None


def future_horizon(max_future_s: float) -> datetime:
    """Event times after this (wall clock + max_future_s) are dead-lettered as from_the_future: one producer
    with a wrong clock must not move its entity's latest event time ahead, which would make the entity's next
    real events out_of_order until the wall clock caught up."""
    return datetime.fromtimestamp(time.time() + max_future_s, timezone.utc)


def future_detail(event_time: datetime, max_future_s: float) -> str:
    return f"event time {event_time.isoformat()} is more than max_future_s={max_future_s:g} ahead of the wall clock"
