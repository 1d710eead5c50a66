"""Every kind of bad input maps to a dead-letter reason; good input decodes."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import DecodeError
from pipeline.features.streams import SensorStream, StreamSpec, TransactionStream

TX = TransactionStream(max_message_bytes=1024)
SN = SensorStream(["Current", "Pressure"], max_message_bytes=1024)
GOOD_TX = (
    b'{"transaction_id":"T1","customer_id":"C1","terminal_id":"T9","amount":10.5,"timestamp":"2018-04-01T00:00:31Z"}'
)


@pytest.mark.parametrize(
    ("spec", "value", "reason"),
    [
        (TX, b"{not json", "malformed_json"),
        (TX, b"", "malformed_json"),
        (TX, b"[1,2]", "schema_violation"),
        (TX, None, "empty_value"),
        (
            TX,
            b'{"transaction_id":"T1","customer_id":"C1","terminal_id":"T9","timestamp":"2018-04-01T00:00:31Z"}',
            "missing_field",
        ),
        (TX, GOOD_TX.replace(b"10.5", b'"10.5"'), "schema_violation"),
        (TX, GOOD_TX.replace(b"10.5", b"1e999"), "non_finite_number"),
        (TX, GOOD_TX.replace(b"10.5", b"NaN"), "non_finite_number"),
        (TX, GOOD_TX.replace(b"10.5", b"-Infinity"), "non_finite_number"),
        (TX, GOOD_TX.replace(b'"C1"', b'"C 1"'), "bad_entity_id"),
        (TX, GOOD_TX.replace(b'"C1"', b"42"), "schema_violation"),
        (TX, GOOD_TX.replace(b"2018-04-01T00:00:31Z", b"2018-04-01T00:00:31"), "schema_violation"),
        (TX, GOOD_TX[:-1] + b',"pad":"' + b"x" * 2000 + b'"}', "oversize"),
        (SN, b'{"device_id":"d1","timestamp":"2020-01-01T00:00:00Z","values":{"Current":1.0}}', "missing_channels"),
        (
            SN,
            b'{"device_id":"d1","timestamp":"2020-01-01T00:00:00Z","values":{"Current":1e999,"Pressure":1}}',
            "non_finite_number",
        ),
    ],
)
def test_bad_input_reasons(spec: TransactionStream, value: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        spec.decode(value)
    assert err.value.reason == reason


def test_good_records_decode() -> None:
    tx = TX.decode(GOOD_TX)
    assert tx.customer_id == "C1" and tx.amount == 10.5
    reading = SN.decode(
        b'{"device_id":"d1","timestamp":"2020-01-01T00:00:00Z","values":{"Current":1.0,"Pressure":2,"Extra":3}}'
    )
    cols = SN.columns([reading])
    assert cols.base.tolist() == [[1.0, 2.0]]
    assert cols.entity_ids == ["d1"]


LABEL = (
    b'{"transaction_id":"T1","customer_id":"C1","terminal_id":"T9","is_fraud":true,'
    b'"labelled_at":"2018-04-08T00:00:31Z"}'
)
SENSOR = b'{"device_id":"d1","timestamp":"2020-01-01T00:00:00Z","values":{"Current":1.0,"Pressure":2.0}}'


@pytest.mark.parametrize(
    "stamp",
    [
        b"9999-12-31T23:59:59-23:59",
        b"0001-01-01T00:00:00+23:59",
        b"1899-12-31T23:59:59Z",
        b"2200-01-01T00:00:00Z",
        b"2199-12-31T23:59:59-00:01",
        b"0001-01-01T00:00:00Z",
    ],
)
def test_event_times_outside_1900_2200_utc_are_dead_lettered(stamp: bytes) -> None:
    """The issue's poison pill: valid local times whose UTC conversion leaves datetime's range."""
    from pipeline.features.streams import LabelStream

    cases: list[tuple[StreamSpec, bytes, bytes]] = [
        (TX, GOOD_TX, b"2018-04-01T00:00:31Z"),
        (SN, SENSOR, b"2020-01-01T00:00:00Z"),
        (LabelStream(), LABEL, b"2018-04-08T00:00:31Z"),
    ]
    for spec, good, ts in cases:
        with pytest.raises(DecodeError) as err:
            spec.decode(good.replace(ts, stamp))
        assert err.value.reason == "timestamp_out_of_range", spec
        assert "outside 1900-01-01T00:00:00Z .. 2200-01-01T00:00:00Z" in err.value.detail


def test_event_times_at_the_bounds_are_accepted() -> None:
    for stamp in (b"1900-01-01T00:00:00Z", b"2199-12-31T23:59:59.999999Z", b"1900-01-01T00:00:00-05:00"):
        assert TX.decode(GOOD_TX.replace(b"2018-04-01T00:00:31Z", stamp)).timestamp.year in (1900, 2199)


@pytest.mark.parametrize(
    ("spec", "value"),
    [
        (TX, GOOD_TX.replace(b"10.5,", b'25.0,"amount":999999.0,')),
        (TX, GOOD_TX.replace(b'"T1",', b'"T1","transaction_id":"T2",')),
        (TX, GOOD_TX[:-1] + b',"currency":"EUR","currency":"USD"}'),
        (SN, SENSOR.replace(b'"Current":1.0', b'"Current":1.0,"Current":5.0')),
        (SN, SENSOR.replace(b'"device_id":"d1"', b'"device_id":"d1","device_id":"d2"')),
        (SN, SENSOR.replace(b'"device_id":"d1"', b'"device_id":"d:1","device_id":"d\\u003a1"')),
    ],
)
def test_duplicate_keys_are_dead_lettered(spec: TransactionStream, value: bytes) -> None:
    """JSON parsers keep the last value silently; a payment read either way must not be scored."""
    with pytest.raises(DecodeError) as err:
        spec.decode(value)
    assert err.value.reason == "duplicate_key"


def test_records_without_a_key_are_dead_lettered() -> None:
    from pipeline.processing.decode import validate
    from pipeline.records import RawRecord

    with pytest.raises(DecodeError) as err:
        validate(TX, RawRecord("tx", 0, 0, None, GOOD_TX, 0))
    assert err.value.reason == "missing_key"
    assert validate(TX, RawRecord("tx", 0, 0, b"C1", GOOD_TX, 0)).customer_id == "C1"


def test_undeclared_values_keys_are_ignored_whatever_they_hold() -> None:
    """README: keys of `values` the stream does not declare are ignored. A probe's device sent a status text
    beside its numbers ("extra": "x") and every reading was dead-lettered `schema_violation`. A declared
    channel that is wrong still is, naming that channel."""
    spec = SensorStream(["flow", "vibration"])
    base = {"device_id": "P-9", "timestamp": "2024-05-01T10:00:00Z"}
    ok = spec.decode(json.dumps({**base, "values": {"flow": 12.0, "vibration": 1.0, "extra": "x", "n": None}}).encode())
    assert (ok.values["flow"], ok.values["vibration"]) == (12.0, 1.0)
    with pytest.raises(DecodeError) as bad:
        spec.decode(json.dumps({**base, "values": {"flow": "12", "vibration": 1.0, "extra": "x"}}).encode())
    assert bad.value.reason == "schema_violation" and "values.flow" in str(bad.value)
    with pytest.raises(DecodeError) as missing:
        spec.decode(json.dumps({**base, "values": {"flow": 12.0, "extra": "x"}}).encode())
    assert missing.value.reason == "missing_channels" and "vibration" in str(missing.value)
