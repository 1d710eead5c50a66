"""Every kind of bad input maps to a dead-letter reason; good input decodes."""

from __future__ import annotations

import pytest

from pipeline.errors import DecodeError
from pipeline.features.streams import SensorStream, TransactionStream

TX = TransactionStream(max_message_bytes=1024)
SN = SensorStream(["Current", "Pressure"], max_message_bytes=1024)
GOOD_TX = (b'{"transaction_id":"T1","customer_id":"C1","terminal_id":"T9","amount":10.5,'
           b'"timestamp":"2018-04-01T00:00:31Z"}')


@pytest.mark.parametrize(
    ("spec", "value", "reason"),
    [
        (TX, b"{not json", "malformed_json"),
        (TX, b"", "malformed_json"),
        (TX, b"[1,2]", "schema_violation"),
        (TX, None, "empty_value"),
        (TX, b'{"transaction_id":"T1","customer_id":"C1","terminal_id":"T9","timestamp":"2018-04-01T00:00:31Z"}',
         "missing_field"),
        (TX, GOOD_TX.replace(b"10.5", b'"10.5"'), "schema_violation"),
        (TX, GOOD_TX.replace(b"10.5", b"1e999"), "non_finite_number"),
        (TX, GOOD_TX.replace(b"10.5", b"NaN"), "non_finite_number"),
        (TX, GOOD_TX.replace(b"10.5", b"-Infinity"), "non_finite_number"),
        (TX, GOOD_TX.replace(b'"C1"', b'"C 1"'), "bad_entity_id"),
        (TX, GOOD_TX.replace(b'"C1"', b"42"), "schema_violation"),
        (TX, GOOD_TX.replace(b"2018-04-01T00:00:31Z", b"2018-04-01T00:00:31"), "schema_violation"),
        (TX, GOOD_TX[:-1] + b',"pad":"' + b"x" * 2000 + b'"}', "oversize"),
        (SN, b'{"device_id":"d1","timestamp":"2020-01-01T00:00:00Z","values":{"Current":1.0}}', "missing_channels"),
        (SN, b'{"device_id":"d1","timestamp":"2020-01-01T00:00:00Z","values":{"Current":1e999,"Pressure":1}}',
         "non_finite_number"),
    ],
)
def test_bad_input_reasons(spec: TransactionStream, value: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        spec.decode(value)
    assert err.value.reason == reason


def test_good_records_decode() -> None:
    tx = TX.decode(GOOD_TX)
    assert tx.customer_id == "C1" and tx.amount == 10.5
    reading = SN.decode(b'{"device_id":"d1","timestamp":"2020-01-01T00:00:00Z",'
                        b'"values":{"Current":1.0,"Pressure":2,"Extra":3}}')
    cols = SN.columns([reading])
    assert cols.base.tolist() == [[1.0, 2.0]]
    assert cols.entity_ids == ["d1"]
