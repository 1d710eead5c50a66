"""msgspec mirrors of `schemas.types` for the hot path: decode a *valid* record in about a microsecond.

The pydantic models in `schemas.types` stay the authority. A record is taken from the fast path only if
every rule below holds; anything the fast path rejects (or cannot vouch for) is decoded again by pydantic,
which accepts it or names the dead-letter reason exactly as before. So the fast path must never accept
what pydantic rejects, nor decode a value differently; tests/unit/test_fast_decode.py runs a corpus of
good and bad records through both paths to hold that.

Strictness, rule by rule (pydantic strict mode, extra="forbid"):

* unknown fields: `forbid_unknown_fields`; missing required fields: msgspec rejects.
* entity ids, channel names, currency: the same patterns, anchored with `\\A...\\Z` (Python's `$` would
  also match before a trailing newline; pydantic's Rust regex does not) and ASCII classes only. Ids and
  channel names repeat from record to record, so a name that matched once is remembered (bounded sets)
  and the regex runs only for names not seen yet: 8 channel-name regexes per reading would cost more
  than the whole pydantic decode.
* numbers: msgspec, like pydantic, takes JSON ints and floats as float and rejects bools and strings;
  out-of-range literals (`1e400`) fail the `ge`/`le` bounds below, so no infinity gets through (JSON
  has no NaN literal; msgspec rejects `NaN`/`Infinity` tokens).
* timestamps: kept as a string by msgspec, accepted only in the plain RFC 3339 shape
  `YYYY-MM-DDTHH:MM:SS[.ffffff](Z|+HH:MM|-HH:MM)` with in-range fields and then parsed with
  `datetime.fromisoformat` (which checks the calendar); every other spelling pydantic may accept
  (lower-case `t`/`z`, a space, `+HHMM`, more than 6 fractional digits, ...) goes the slow path. Times
  outside schemas.types' EVENT_TIME_MIN..MAX go the slow path too (which names timestamp_out_of_range);
  years 1901..2198 are inside whatever the offset, so only the others need the exact comparison.
* duplicate keys: msgspec (like orjson and pydantic) keeps the last value silently. The fast path vouches
  only for values without a backslash whose count of `:` bytes equals the number of keys decoded plus the
  colons inside the decoded strings. Why that is exact: without a backslash every string token is
  verbatim, a `:` outside strings separates exactly one key occurrence from its value, and the decoded
  strings are a subset of the tokens, so colons(raw) >= occurrences + colons(decoded), with equality only
  when no key occurs twice. Anything else goes the slow path, which detects duplicates exactly.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from schemas.types import EVENT_TIME_MAX, EVENT_TIME_MIN

_MAX = sys.float_info.max
FiniteFloat = Annotated[float, Meta(ge=-_MAX, le=_MAX)]
ENTITY_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
CHANNEL_NAME = re.compile(r"\A[A-Za-z0-9_. -]{1,64}\Z")

TIMESTAMP = re.compile(
    r"\A[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])\Z"
)


def parse_timestamp(text: str) -> datetime | None:
    """Aware datetime for the plain RFC 3339 shape (see module doc), None for anything else."""
    if TIMESTAMP.match(text) is None:
        return None
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:  # e.g. February 30th
        return None
    if not "1900" < text[:4] < "2199" and not EVENT_TIME_MIN <= dt.timestamp() < EVENT_TIME_MAX:
        return None
    return dt


def _keys_once(value: bytes, keys: int, strings: str) -> bool:
    """No key occurs twice (see the module doc); False also when it cannot tell. `strings`: the decoded
    string values, concatenated (one count instead of one per string)."""
    return b"\\" not in value and value.count(b":") == keys + strings.count(":")


class _Matched:
    """Names that matched `pattern` (at most `cap`; when full it starts over, so memory stays bounded)."""

    def __init__(self, pattern: re.Pattern[str], cap: int) -> None:
        self.pattern, self.cap = pattern, cap
        self.seen: set[str] = set()

    def all(self, names: Iterable[str]) -> bool:
        seen = self.seen
        if seen.issuperset(names):
            return True
        for name in names:
            if name not in seen:
                if self.pattern.match(name) is None:
                    return False
                if len(seen) >= self.cap:
                    seen.clear()
                seen.add(name)
        return True

    def one(self, name: str) -> bool:
        return name in self.seen or self.all((name,))


_entities = _Matched(ENTITY_ID, 200_000)
_channels = _Matched(CHANNEL_NAME, 4096)


class SensorReadingWire(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    device_id: str  # ENTITY_ID, checked in sensor_reading()
    timestamp: str
    values: Annotated[dict[str, FiniteFloat], Meta(min_length=1, max_length=64)]  # keys: CHANNEL_NAME


class TransactionWire(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    transaction_id: Annotated[str, Meta(min_length=1, max_length=64)]
    customer_id: str  # ENTITY_ID, checked in transaction()
    terminal_id: str  # ENTITY_ID
    amount: Annotated[float, Meta(ge=0, le=1_000_000_000)]
    timestamp: str
    currency: Annotated[str, Meta(pattern=r"\A[A-Z]{3}\Z")] | None = None


class SensorReadingFast(msgspec.Struct, frozen=True, gc=False):
    """Attribute-compatible with schemas.types.SensorReading (what the stream specs read)."""

    device_id: str
    timestamp: datetime
    values: dict[str, float]


class TransactionFast(msgspec.Struct, frozen=True, gc=False):
    """Attribute-compatible with schemas.types.Transaction."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    amount: float
    timestamp: datetime
    currency: str | None = None


_sensor = msgspec.json.Decoder(SensorReadingWire)
_transaction = msgspec.json.Decoder(TransactionWire)


def sensor_reading(value: bytes) -> SensorReadingFast | None:
    """The reading if the fast path vouches for it, else None (decode it with pydantic)."""
    try:
        w = _sensor.decode(value)
    except Exception:  # noqa: BLE001 - whatever it is, pydantic decides and names the reason
        return None
    if not (_entities.one(w.device_id) and _channels.all(w.values)):
        return None
    ts = parse_timestamp(w.timestamp)
    if ts is None or not _keys_once(value, 3 + len(w.values), w.device_id + w.timestamp):  # names: no ':'
        return None
    return SensorReadingFast(w.device_id, ts, w.values)


def transaction(value: bytes) -> TransactionFast | None:
    try:
        w = _transaction.decode(value)
    except Exception:  # noqa: BLE001 - see sensor_reading
        return None
    if not (_entities.one(w.customer_id) and _entities.one(w.terminal_id)):
        return None
    ts = parse_timestamp(w.timestamp)
    if ts is None:
        return None
    if w.currency is None:
        if b'"currency"' in value:  # "currency": null, or a string "currency": cannot tell, ask pydantic
            return None
        keys = 5
    else:
        keys = 6  # the currency pattern has no ':'
    if not _keys_once(value, keys, w.transaction_id + w.customer_id + w.terminal_id + w.timestamp):
        return None
    return TransactionFast(w.transaction_id, w.customer_id, w.terminal_id, w.amount, ts, w.currency)
