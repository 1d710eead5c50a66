"""Stream definitions: how a raw Kafka value becomes (entity, event time, feature vector).

Decoding is per record (so one bad record is dead-lettered alone); features are computed per batch as
numpy columns. Features that depend on the entity's previous event (time since last payment) are
finished by `finish()` once the entity's previous timestamp is known, inside the scorer's rounds.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import orjson
from pydantic import TypeAdapter, ValidationError

from pipeline.errors import DecodeError, StateError
from pipeline.features.terminal import FEEDBACK_FEATURES, TERMINAL_FEATURES, TerminalContext
from schemas import fast
from schemas.types import SensorReading, Transaction, TransactionLabel

DAY = 86400.0
WEEK = 7 * DAY

StreamKind = Literal["transactions", "sensors", "transaction-labels"]
WIRE_TIME_FIELD = "timestamp"
# a decoded record: the msgspec mirror when the fast path vouches for it, else the pydantic model (same attributes)
TransactionRecord = Transaction | fast.TransactionFast
SensorRecord = SensorReading | fast.SensorReadingFast
DecodedRecord = TransactionRecord | SensorRecord | TransactionLabel
R = TypeVar("R", TransactionRecord, SensorRecord, TransactionLabel)
BASE_TRANSACTION_FEATURES = ["log_amount", "log_seconds_since_prev", "hour_sin", "hour_cos", "dow_sin", "dow_cos"]


@dataclass
class EventColumns:
    entity_ids: list[str]
    ts: np.ndarray  # (N,) float64 epoch seconds
    base: np.ndarray  # (N, F) float64 features that need no state


def _reason(err: ValidationError, entity_field: str, names: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The dead-letter reason and detail of a validation error; `names`: the kind's field -> the stream's own
    name for it (a stream file's entity_key / time_field), so the detail names the field the producer wrote."""
    first = err.errors(include_url=False)[0]
    kind = first["type"]
    parts = [str(p) for p in first["loc"]]
    if parts and names:
        parts[0] = names.get(parts[0], parts[0])
    loc = ".".join(parts)
    detail = f"{loc}: {first['msg']}"
    if kind == "json_invalid" or kind == "json_type":
        return "malformed_json", first["msg"]
    if kind == "finite_number":
        return "non_finite_number", detail
    if kind == "missing":
        return "missing_field", detail
    if kind == "timestamp_out_of_range":
        return "timestamp_out_of_range", detail
    if kind == "string_pattern_mismatch" and first["loc"] and first["loc"][0] in (entity_field, "terminal_id"):
        return "bad_entity_id", detail
    return "schema_violation", detail


class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def duplicate_key(value: bytes) -> str | None:
    """The first key that occurs twice in one JSON object of `value` (None: no duplicate, or not JSON, which
    pydantic then names). orjson, msgspec and pydantic all keep the last value silently, so a payment with
    `"amount": 25.0, ..., "amount": 999999.0` would be scored with either, depending on the parser."""
    try:
        json.loads(value, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as dup:
        return str(dup.args[0])
    except (ValueError, RecursionError):
        return None
    return None


@dataclass(frozen=True)
class StreamIdentity:
    """A declared stream's name and its own entity/time field names (None: the kind's)."""

    name: str | None = None
    entity_key: str | None = None
    time_field: str | None = None


class StreamSpec(Generic[R]):
    """A stream's contract: decode one record, featurize a batch. Stateless: partition-local state (terminal
    contexts) is held by the caller and passed in.

    `kind` fixes the wire rules and features; `name` is the stream's identity (metrics, entity state, alerts),
    the kind's name unless a stream file declares another. A declared stream may call its entity and time
    fields otherwise (`entity_key`, `time_field`): its records are renamed to the kind's fields before
    validation, so every rule and dead-letter reason stays the kind's."""

    kind: ClassVar[StreamKind]
    entity_field: ClassVar[str]  # the kind's wire name of the entity field
    feature_names: list[str]
    _adapter: TypeAdapter[Any]
    _fast: Callable[[bytes], R | None] | None = None  # schemas.fast: None = cannot vouch, ask pydantic

    def __init__(
        self,
        max_message_bytes: int = 65536,
        *,
        identity: StreamIdentity | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        identity = identity or StreamIdentity()
        self.name: str = identity.name or self.kind
        self.entity_key = identity.entity_key or self.entity_field
        wanted = {self.entity_key: self.entity_field, identity.time_field or WIRE_TIME_FIELD: WIRE_TIME_FIELD}
        self._renames = {ours: wire for ours, wire in wanted.items() if ours != wire}
        self._own_names = {wire: ours for ours, wire in self._renames.items()}

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def decode(self, value: bytes | None) -> R:
        """A record with the attributes of the stream's schemas.types model (a schemas.fast mirror when the
        msgspec fast path vouches for it, else the pydantic model), or DecodeError with the reason."""
        if value is None:
            raise DecodeError("empty_value", "record has no value (tombstone)")
        if len(value) > self.max_message_bytes:
            raise DecodeError("oversize", f"{len(value)} bytes > max_message_bytes={self.max_message_bytes}")
        if self._renames:
            value = self._to_wire(value)
        if self._fast is not None:
            rec = self._fast(value)
            if rec is not None:
                try:
                    self.check(rec)
                    return rec
                except DecodeError:
                    pass  # the pydantic path below raises the same reason
        dup = duplicate_key(value)  # the slow path only: the fast path never vouches for a duplicate key
        if dup is not None:
            raise DecodeError("duplicate_key", f"key {dup[:80]!r} occurs twice in one object")
        try:
            record: R = self._adapter.validate_json(value)
        except ValidationError as err:
            raise DecodeError(*_reason(err, self.entity_field, self._own_names)) from None
        self.check(record)
        return record

    def _to_wire(self, value: bytes) -> bytes:
        """The record with the stream's own entity/time field names renamed to the kind's."""
        dup = duplicate_key(value)
        if dup is not None:
            raise DecodeError("duplicate_key", f"key {dup[:80]!r} occurs twice in one object")
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise DecodeError("malformed_json", str(exc)) from None
        if not isinstance(obj, dict):
            raise DecodeError("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
        for ours, wire in self._renames.items():
            if wire in obj:
                raise DecodeError("schema_violation", f"{wire}: unexpected field (this stream's field is {ours!r})")
            if ours in obj:
                obj[wire] = obj.pop(ours)
        return orjson.dumps(obj)

    def parse(self, obj: dict[str, Any]) -> R:
        """Validate an already-decoded dict (files, simulators) by exactly the wire rules of `decode`."""
        return self.decode(orjson.dumps(obj))

    def check(self, record: R) -> None:
        """Stream-specific checks beyond the schema; raise DecodeError."""

    def entity_of(self, record: R) -> str:
        return str(getattr(record, self.entity_field))

    def dedupe_key(self, record: R) -> str | None:
        """What makes a record a resend of one already seen (pipeline.processing.dedupe); None: never."""
        return None

    def columns(
        self,
        records: Sequence[R],
        partitions: np.ndarray | None = None,
        contexts: Mapping[int, TerminalContext] | None = None,
        frozen: np.ndarray | None = None,
    ) -> EventColumns:
        """partitions: each record's source partition; contexts: partition -> its terminal context (the
        partition-local state a TransactionStream with terminal features reads and updates); frozen: records
        featurised without updating partition-local state (late events)."""
        raise NotImplementedError

    def finish(self, base: np.ndarray, ts: np.ndarray, prev_ts: np.ndarray) -> np.ndarray:
        """Complete the state-dependent features of one round (distinct entities)."""
        return base


class TransactionStream(StreamSpec[TransactionRecord]):
    kind = "transactions"
    entity_field = "customer_id"

    def __init__(
        self,
        max_message_bytes: int = 65536,
        *,
        terminal_context: bool = False,
        terminal_tau_s: float = DAY,
        fraud_feedback_tau_s: float | None = None,
        identity: StreamIdentity | None = None,
    ) -> None:
        """terminal_context=True adds per-terminal features (pipeline.features.terminal), one context per
        partition; fraud_feedback_tau_s adds the terminal's fraud rate from label feedback (`add_labels`)."""
        super().__init__(max_message_bytes, identity=identity)
        self._adapter = TypeAdapter(Transaction)
        self._fast = fast.transaction
        self.feature_names = list(BASE_TRANSACTION_FEATURES)
        if fraud_feedback_tau_s is not None and not terminal_context:
            raise ValueError("fraud feedback is a terminal-context feature: set terminal_context=True")
        self.terminal_context = terminal_context
        self.terminal_tau_s = float(terminal_tau_s)
        self.fraud_feedback_tau_s = None if fraud_feedback_tau_s is None else float(fraud_feedback_tau_s)
        if terminal_context:
            self.feature_names += TERMINAL_FEATURES
            if fraud_feedback_tau_s is not None:
                self.feature_names += FEEDBACK_FEATURES

    @property
    def label_feedback(self) -> bool:
        return self.fraud_feedback_tau_s is not None

    def dedupe_key(self, record: TransactionRecord) -> str | None:
        """A payment is its transaction_id: a resend carries the same one."""
        return record.transaction_id

    def new_context(self) -> TerminalContext:
        """An empty terminal context with the model's parameters (one per partition, held in its state)."""
        if not self.terminal_context:
            raise ValueError("this TransactionStream has no terminal context")
        return TerminalContext(self.terminal_tau_s, feedback_tau_s=self.fraud_feedback_tau_s)

    def restore_context(self, blob: bytes | None, partition: int) -> TerminalContext:
        """The partition's context from its snapshot (a new one without); StateError if it cannot serve
        this model."""
        ctx = self.new_context()
        if blob is None:
            return ctx
        try:
            saved = TerminalContext.restore(blob)
        except ValueError as exc:
            raise StateError(f"terminal context of partition {partition}: {exc}") from None
        if not saved.same_parameters(ctx):
            raise StateError(
                f"terminal context of partition {partition} was saved with other parameters "
                f"({saved.params()} vs the model's {ctx.params()}); use a new run id"
            )
        return saved

    def columns(
        self,
        records: Sequence[TransactionRecord],
        partitions: np.ndarray | None = None,
        contexts: Mapping[int, TerminalContext] | None = None,
        frozen: np.ndarray | None = None,
    ) -> EventColumns:
        n = len(records)
        ts = np.fromiter((r.timestamp.timestamp() for r in records), np.float64, n)
        amount = np.fromiter((r.amount for r in records), np.float64, n)
        terminals = [r.terminal_id for r in records] if self.terminal_context else None
        return self.columns_from_arrays(
            [r.customer_id for r in records], ts, amount, terminals, partitions, contexts, frozen
        )

    def columns_from_arrays(
        self,
        entity_ids: list[str],
        ts: np.ndarray,
        amount: np.ndarray,
        terminal_ids: Sequence[str] | None = None,
        partitions: np.ndarray | None = None,
        contexts: Mapping[int, TerminalContext] | None = None,
        frozen: np.ndarray | None = None,
    ) -> EventColumns:
        """Batch features; with terminal context, each partition's events must come in its log order (they
        update its context, `contexts[p]`); partitions=None means all from partition 0."""
        base = np.empty((len(ts), self.n_features), np.float64)
        base[:, 0] = np.log1p(amount)
        base[:, 1] = 0.0
        hour = 2 * math.pi * (ts % DAY) / DAY
        dow = 2 * math.pi * ((ts + 3 * DAY) % WEEK) / WEEK  # epoch day 0 was a Thursday
        base[:, 2], base[:, 3] = np.sin(hour), np.cos(hour)
        base[:, 4], base[:, 5] = np.sin(dow), np.cos(dow)
        if self.terminal_context:
            if terminal_ids is None or contexts is None:
                raise ValueError("terminal context needs terminal_ids and the partitions' contexts")
            if partitions is None:
                base[:, 6:] = contexts[0].features(terminal_ids, ts, base[:, 0], frozen)
            else:
                for p in np.unique(partitions).tolist():
                    idx = np.flatnonzero(partitions == p)
                    base[idx, 6:] = contexts[int(p)].features(
                        [terminal_ids[i] for i in idx.tolist()],
                        ts[idx],
                        base[idx, 0],
                        None if frozen is None else frozen[idx],
                    )
        return EventColumns(entity_ids, ts, base)

    def finish(self, base: np.ndarray, ts: np.ndarray, prev_ts: np.ndarray) -> np.ndarray:
        out = base.copy()
        gap = np.where(np.isnan(prev_ts), DAY, np.clip(ts - prev_ts, 0.0, 30 * DAY))
        out[:, 1] = np.log1p(gap)
        return out


class SensorStream(StreamSpec[SensorRecord]):
    kind = "sensors"
    entity_field = "device_id"

    def __init__(
        self,
        channels: Sequence[str],
        max_message_bytes: int = 65536,
        *,
        identity: StreamIdentity | None = None,
    ) -> None:
        super().__init__(max_message_bytes, identity=identity)
        if not channels:
            raise ValueError("sensor stream needs at least one channel")
        self._adapter = TypeAdapter(SensorReading)
        self._fast = fast.sensor_reading
        self.feature_names = list(channels)
        self._channel_set = frozenset(channels)
        self._pick = operator.itemgetter(*self.feature_names)  # one channel: a scalar, else a tuple

    def decode(self, value: bytes | None) -> SensorRecord:
        """As StreamSpec.decode, except that keys of `values` the stream does not declare are ignored whatever
        they hold (a device may send a status text beside its numbers): a schema violation is retried once
        with only the declared channels, so it stands only where a declared field is wrong. The error path
        alone pays for it."""
        try:
            return super().decode(value)
        except DecodeError as exc:
            trimmed = self._declared_only(value) if exc.reason == "schema_violation" else None
            if trimmed is None:
                raise
        return super().decode(trimmed)

    def _declared_only(self, value: bytes | None) -> bytes | None:
        """The record with its undeclared `values` keys left out; None when it has none (or is not an object)."""
        try:
            obj = orjson.loads(value or b"")
        except orjson.JSONDecodeError:
            return None
        values = obj.get("values") if isinstance(obj, dict) else None
        if not isinstance(values, dict) or self._channel_set.issuperset(values):
            return None
        obj["values"] = {k: v for k, v in values.items() if k in self._channel_set}
        return orjson.dumps(obj)

    def check(self, record: SensorRecord) -> None:
        missing = self._channel_set.difference(record.values)
        if missing:
            raise DecodeError("missing_channels", ", ".join(sorted(missing)))

    def dedupe_key(self, record: SensorRecord) -> str | None:
        """A reading is its device, time and the values the model reads: an at-least-once resend repeats all
        three, while two different readings stamped with the same (coarse) time are both kept. The time and
        values enter as the hash of their floats (a float's hash is the same in every process, unlike a
        string's or a datetime's, so a restored window still matches): a quarter of the cost of their text."""
        return f"{record.device_id}\x1f{hash((record.timestamp.timestamp(), self._pick(record.values))):x}"

    def columns(
        self,
        records: Sequence[SensorRecord],
        partitions: np.ndarray | None = None,
        contexts: Mapping[int, TerminalContext] | None = None,
        frozen: np.ndarray | None = None,
    ) -> EventColumns:
        n = len(records)
        ts = np.fromiter((r.timestamp.timestamp() for r in records), np.float64, n)
        pick = self._pick
        base = np.array([pick(r.values) for r in records], np.float64).reshape(n, self.n_features)
        return EventColumns([r.device_id for r in records], ts, base)


class LabelStream(StreamSpec[TransactionLabel]):
    """Label feedback for a customer-keyed TransactionStream (schemas/transaction_label.schema.json): decoded
    and validated like any stream, keyed by customer so a label lands in its payment's partition number.
    identity.entity_key: the payments stream's name for the customer field, which its labels use too."""

    kind = "transaction-labels"
    entity_field = "customer_id"

    def __init__(self, max_message_bytes: int = 65536, *, identity: StreamIdentity | None = None) -> None:
        super().__init__(max_message_bytes, identity=identity)
        self._adapter = TypeAdapter(TransactionLabel)
        self.feature_names = []


def transaction_stream_for(
    feature_names: Sequence[str],
    card: dict[str, Any],
    max_message_bytes: int = 65536,
    identity: StreamIdentity | None = None,
) -> TransactionStream:
    """The TransactionStream a checkpoint was trained on, read from its feature names and model card."""
    names = list(feature_names)
    base = list(BASE_TRANSACTION_FEATURES)
    layouts = {
        tuple(base): (False, False),
        tuple(base + TERMINAL_FEATURES): (True, False),
        tuple(base + TERMINAL_FEATURES + FEEDBACK_FEATURES): (True, True),
    }
    if tuple(names) not in layouts:
        raise ValueError(f"transactions model has features {names}; this build knows {[list(k) for k in layouts]}")
    terminal, feedback = layouts[tuple(names)]
    tau = float(card.get("terminal_tau_s", DAY))
    fb_tau = card.get("fraud_feedback_tau_s")
    if feedback and fb_tau is None:
        raise ValueError("transactions model reads terminal_fraud_risk but its card has no fraud_feedback_tau_s")
    return TransactionStream(
        max_message_bytes,
        terminal_context=terminal,
        terminal_tau_s=tau,
        fraud_feedback_tau_s=float(fb_tau) if feedback and fb_tau is not None else None,
        identity=identity,
    )


def make_stream(
    kind: str,
    *,
    channels: Sequence[str] = (),
    max_message_bytes: int = 65536,
    card: dict[str, Any] | None = None,
    identity: StreamIdentity | None = None,
) -> TransactionStream | SensorStream:
    """card: the model card of the checkpoint the stream feeds (decides the transaction feature layout)."""
    if kind == "transactions":
        if card is not None and "feature_names" in card:
            return transaction_stream_for(card["feature_names"], card, max_message_bytes, identity)
        return TransactionStream(max_message_bytes, identity=identity)
    if kind == "sensors":
        return SensorStream(channels, max_message_bytes, identity=identity)
    raise ValueError(f"unknown stream kind {kind!r}")
