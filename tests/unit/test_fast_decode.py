"""The msgspec fast path (schemas.fast) against the pydantic path: a corpus of good and bad records must
give the same accept/reject decision, the same decoded values and the same dead-letter reason."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from pipeline.errors import DecodeError
from pipeline.features.streams import SensorStream, StreamSpec, TransactionStream
from schemas import fast

CHANNELS = ["Current", "Pressure", "Volume Flow RateRMS"]


def _specs(make: Any) -> tuple[StreamSpec, StreamSpec]:
    with_fast, pydantic_only = make(), make()
    pydantic_only._fast = None  # noqa: SLF001 - the pydantic-only reference decoder
    return with_fast, pydantic_only


SN, SN_REF = _specs(lambda: SensorStream(CHANNELS, max_message_bytes=4096))
TX, TX_REF = _specs(lambda: TransactionStream(max_message_bytes=4096))

SENSOR: dict[str, Any] = {
    "device_id": "pump-00001",
    "timestamp": "2020-03-09T10:14:33.000000Z",
    "values": {"Current": 1.914219, "Pressure": 0.30926, "Volume Flow RateRMS": 32.311354},
}
TXN = {
    "transaction_id": "T1",
    "customer_id": "C000001",
    "terminal_id": "TERM.1:a_b-c",
    "amount": 10.5,
    "timestamp": "2018-04-01T00:00:31Z",
}

TIMESTAMPS = [
    "2020-01-01T00:00:00Z",
    "2020-01-01T00:00:00.1Z",
    "2020-01-01T00:00:00.123456Z",
    "2020-01-01T00:00:00.1234567Z",
    "2020-01-01T00:00:00.123456789Z",
    "2020-01-01T00:00:00z",
    "2020-01-01t00:00:00Z",
    "2020-01-01 00:00:00Z",
    "2020-01-01T00:00:00+00:00",
    "2020-01-01T00:00:00-00:00",
    "2020-01-01T00:00:00+05:30",
    "2020-01-01T00:00:00-11:59",
    "2020-01-01T00:00:00+23:59",
    "2020-01-01T00:00:00+24:00",
    "2020-01-01T00:00:00+00:60",
    "2020-01-01T00:00:00+0530",
    "2020-01-01T00:00:00+01",
    "2020-01-01T00:00:00 Z",
    "2020-01-01T00:00:00",
    "2020-01-01T00:00Z",
    "2020-01-01",
    "2020-01-01T24:00:00Z",
    "2020-01-01T23:59:60Z",
    "2020-01-01T23:60:00Z",
    "2020-02-29T12:00:00Z",
    "2021-02-29T12:00:00Z",
    "2020-04-31T00:00:00Z",
    "2020-13-01T00:00:00Z",
    "2020-00-01T00:00:00Z",
    "2020-01-00T00:00:00Z",
    "0000-01-01T00:00:00Z",
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59-01:00",
    "2020-01-01T00:00:00.Z",
    "2020-01-01T00:00:00,5Z",
    "\u0662020-01-01T00:00:00Z",
    "2020-01-01T00:00:00Z\n",
    " 2020-01-01T00:00:00Z",
    "",
    "yesterday",
    "1577836800",
]


def _raw(template: dict[str, Any], **changes: Any) -> bytes:
    obj = {**template}
    for k, v in changes.items():
        if v is _DROP:
            obj.pop(k, None)
        else:
            obj[k] = v
    return orjson.dumps(obj)


_DROP = object()


def _sensor_corpus() -> list[bytes]:
    good = _raw(SENSOR)
    out = [
        good,
        good.replace(b"1.914219", b"2"),
        good.replace(b"1.914219", b"-0.0"),
        _raw(SENSOR, values={**SENSOR["values"], "Extra": 3.0}),
    ]
    out += [_raw(SENSOR, timestamp=t) for t in TIMESTAMPS]
    out += [_raw(SENSOR, timestamp=1577836800), _raw(SENSOR, timestamp=None)]
    for key in SENSOR:
        out.append(_raw(SENSOR, **{key: _DROP}))
    out += [
        _raw(SENSOR, unexpected=1),
        _raw(SENSOR, values={}),
        _raw(SENSOR, values={"Current": 1.0}),
        _raw(SENSOR, values=[1, 2]),
        _raw(SENSOR, values={**SENSOR["values"], "bad\nname": 1.0}),
        _raw(SENSOR, values={**SENSOR["values"], "x" * 65: 1.0}),
        _raw(SENSOR, values={**SENSOR["values"], "ok name.1_-": 1.0}),
        _raw(SENSOR, values={f"c{i}": 1.0 for i in range(64)} | SENSOR["values"]),
        _raw(SENSOR, values={f"c{i}": 1.0 for i in range(61)} | SENSOR["values"]),
    ]
    for dev in ["pump 1", "pump-1\n", "-pump", "", "p" * 64, "p" * 65, "a.b:c_d-e", "\u0661", "pümp", 42, None]:
        out.append(_raw(SENSOR, device_id=dev))
    for lit in [
        b"1e400",
        b"-1e400",
        b"1" + b"0" * 400,
        b"123456789012345678901234567890",
        b"true",
        b'"1"',
        b"null",
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1.0e-400",
        b"1.7976931348623157e308",
        b"1.7976931348623159e308",
        b"01",
        b"1.",
        b".5",
        b"+1",
        b"[1]",
        b"{}",
    ]:
        out.append(good.replace(b"1.914219", lit))
    out += [
        good.replace(b'"device_id":"pump-00001"', b'"device_id":"pump-00001","device_id":"pump-00002"'),
        good.replace(b'"Current":1.914219', b'"Current":1.914219,"Current":5.0'),
        good.replace(b"pump-00001", b"pump\\u002d00001"),
        good.replace(b"pump-00001", b"pump-0000\\n"),
        good.replace(b"pump-00001", b"pump-\xff"),
        good.replace(b'"Current"', b'"Cur\\ud800"'),
        b"\xef\xbb\xbf" + good,
        b"  " + good + b" \n",
        good + b" x",
        good + b"\x00",
        good[:-1],
        good + b",",
        good.replace(b"}}", b"},}"),
        b"[" + good + b"]",
        b"",
        b"{oops",
        b"null",
        b"42",
        b'"str"',
        good[:-1] + b',"pad":"' + b"x" * 5000 + b'"}',
    ]
    rng = random.Random(7)
    for _ in range(300):  # number spellings: both paths must parse the same double
        x = rng.choice([rng.uniform(-1e6, 1e6), rng.expovariate(1e-3), 10 ** rng.uniform(-300, 300)])
        fmt = rng.choice(["%r", "%.17g", "%.6f", "%e", "%.3E", "%d"])
        lit = (fmt % (int(x) if fmt == "%d" else x)).encode()
        out.append(good.replace(b"1.914219", lit))
    base = "2020-01-01T00:00:00.000000+00:00"
    alphabet = "0123456789:+-.TZtz "
    for _ in range(400):  # timestamp spellings: mutate one or two characters of a valid one
        chars = list(base)
        for _ in range(rng.choice([1, 2])):
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        out.append(_raw(SENSOR, timestamp="".join(chars)))
    return out


def _transaction_corpus() -> list[bytes]:
    good = _raw(TXN)
    out = [
        good,
        _raw(TXN, currency="EUR"),
        _raw(TXN, currency=None),
        _raw(TXN, currency="eur"),
        _raw(TXN, currency="EURO"),
        _raw(TXN, currency="EU\n"),
        _raw(TXN, currency=1),
    ]
    out += [_raw(TXN, timestamp=t) for t in TIMESTAMPS[::3]]
    for key in TXN:
        out.append(_raw(TXN, **{key: _DROP}))
    out += [_raw(TXN, unexpected=1)]
    for amount in [0, -0.0, 7, 1e9, 1e9 + 1, 1_000_000_001, -1, -1e-300, "10.5", True, None]:
        out.append(_raw(TXN, amount=amount))
    for lit in [b"1e999", b"-1e999", b"NaN", b"-Infinity"]:
        out.append(good.replace(b"10.5", lit))
    for tid in ["", "x" * 64, "x" * 65, "ü" * 64, "ü" * 65, "a b\n", "\U0001f600" * 33, 5]:
        out.append(_raw(TXN, transaction_id=tid))
    for cid in ["C 1", "C1\n", "", "c" * 65, 42]:
        out += [_raw(TXN, customer_id=cid), _raw(TXN, terminal_id=cid)]
    out += [good.replace(b'"T1"', b'"\\ud800"'), good.replace(b'"T1"', b'"\\ud83d\\ude00"')]
    return out


def _outcome(spec: StreamSpec, value: bytes | None) -> tuple[Any, ...]:
    try:
        rec = spec.decode(value)
    except DecodeError as err:
        return ("dead_letter", err.reason, err.detail)
    fields = (
        ("transaction_id", "customer_id", "terminal_id", "amount", "currency")
        if isinstance(spec, TransactionStream)
        else ("device_id", "values")
    )
    return ("ok", rec.timestamp.timestamp(), rec.timestamp.utcoffset(), *(getattr(rec, f) for f in fields))


def _fast_accepts(spec: StreamSpec, value: bytes | None) -> bool:
    """What decode() takes from the fast path without asking pydantic."""
    if value is None or len(value) > spec.max_message_bytes or spec._fast is None:  # noqa: SLF001 - what the fast path vouches for
        return False
    rec = spec._fast(value)  # noqa: SLF001
    if rec is None:
        return False
    try:
        spec.check(rec)
    except DecodeError:
        return False
    return True


@pytest.mark.parametrize(
    ("spec", "ref", "corpus"),
    [(SN, SN_REF, _sensor_corpus()), (TX, TX_REF, _transaction_corpus())],
    ids=["sensors", "transactions"],
)
def test_fast_path_agrees_with_pydantic(spec: StreamSpec, ref: StreamSpec, corpus: list[bytes]) -> None:
    assert len(corpus) > 40
    accepted_fast = 0
    for value in [*corpus, None]:
        assert _outcome(spec, value) == _outcome(ref, value), value
        if _fast_accepts(spec, value):
            accepted_fast += 1
            assert _outcome(ref, value)[0] == "ok", value  # the fast path never accepts what pydantic rejects
    assert accepted_fast >= 5  # and it is really used


def test_fast_path_takes_the_bench_records() -> None:
    from pipeline.bench.load import SensorLoad
    from pipeline.simulate import SENSOR_CHANNELS

    spec = SensorStream(SENSOR_CHANNELS)
    for _, value in SensorLoad(50, seed=3).payloads(0, 200):
        rec = fast.sensor_reading(value)
        assert isinstance(rec, fast.SensorReadingFast)
        assert _outcome(spec, value) == _outcome(_specs(lambda: SensorStream(SENSOR_CHANNELS))[1], value)


def test_columns_from_either_path_are_identical() -> None:
    values = [v for v in _sensor_corpus()[:4]]
    a = SN.columns([SN.decode(v) for v in values])
    b = SN_REF.columns([SN_REF.decode(v) for v in values])
    assert a.entity_ids == b.entity_ids
    assert a.ts.tolist() == b.ts.tolist()
    assert a.base.tolist() == b.base.tolist()
    one = SensorStream(["Current"])
    assert one.columns([one.decode(values[0])]).base.tolist() == [[1.914219]]
