"""The JSON Schema contracts and the Python types that mirror them must agree, record by record."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from pydantic import TypeAdapter, ValidationError

from schemas import SCHEMA_NAMES, load_schema
from schemas.types import Alert, SensorReading, Transaction, TransactionLabel

TYPES: dict[str, Any] = {
    "transaction": Transaction,
    "transaction_label": TransactionLabel,
    "sensor_reading": SensorReading,
    "alert": Alert,
}

VALID_TX = {
    "transaction_id": "T1",
    "customer_id": "C000001",
    "terminal_id": "TERM1",
    "amount": 12.5,
    "timestamp": "2018-04-01T00:00:31Z",
}
VALID_LABEL = {
    "transaction_id": "T1",
    "customer_id": "C000001",
    "terminal_id": "TERM1",
    "is_fraud": True,
    "labelled_at": "2018-04-08T00:00:31Z",
}
VALID_SENSOR = {
    "device_id": "pump-1",
    "timestamp": "2020-03-09T10:14:33+00:00",
    "values": {"Current": 1.33, "Pressure": 0.05},
}
VALID_ALERT = {
    "alert_key": "live|tx|0|5|m@1",
    "run_id": "live",
    "stream": "transactions",
    "entity_id": "C1",
    "event_time": "2018-04-01T00:00:31Z",
    "score": 12.0,
    "threshold": 4.0,
    "severity": "high",
    "model_version": "m@1",
    "top_features": [{"feature": "log_amount", "observed": 6.1, "reconstructed": 3.2, "contribution": 9.0}],
    "source": {"topic": "tx", "partition": 0, "offset": 5},
}


def _variants(base: dict[str, Any], name: str) -> list[tuple[dict[str, Any], bool]]:
    out: list[tuple[dict[str, Any], bool]] = [(base, True)]
    for key in base:
        out.append(({k: v for k, v in base.items() if k != key}, key in ("currency", "severity")))
    out.append(({**base, "unexpected": 1}, False))
    if name == "transaction":
        out += [
            ({**base, "amount": "12"}, False),
            ({**base, "amount": -1}, False),
            ({**base, "customer_id": "bad id"}, False),
            ({**base, "customer_id": ""}, False),
            ({**base, "currency": "EUR"}, True),
            ({**base, "currency": "eur"}, False),
            ({**base, "amount": 7}, True),
            ({**base, "timestamp": "yesterday"}, False),
            # RFC 3339 only (a probe's "20261110" was read as epoch seconds: 1970-08-23)
            ({**base, "timestamp": "20261110"}, False),
            ({**base, "timestamp": "1794312000"}, False),
            ({**base, "timestamp": "1794312000000"}, False),
            ({**base, "timestamp": "2026-11-10T12:00:00+0530"}, False),
            ({**base, "timestamp": "2026-11-10T12:00Z"}, False),
            ({**base, "timestamp": "2026-11-10T12:00:00"}, False),
            ({**base, "timestamp": "2026-11-10t12:00:00.123456789z"}, True),
            ({**base, "timestamp": "2026-11-10T12:00:00-05:00"}, True),
        ]
    if name == "transaction_label":
        out += [
            ({**base, "is_fraud": 1}, False),
            ({**base, "is_fraud": "true"}, False),
            ({**base, "is_fraud": False}, True),
            ({**base, "terminal_id": "bad id"}, False),
            ({**base, "labelled_at": "2018-04-08T00:00:31"}, False),
        ]
    if name == "sensor_reading":
        out += [
            ({**base, "values": {}}, False),
            ({**base, "values": {"Current": "x"}}, False),
            ({**base, "device_id": "x" * 65}, False),
            ({**base, "values": {"a/b": 1.0}}, False),
        ]
    if name == "alert":
        out += [
            ({**base, "stream": "pumps_2"}, True),
            ({**base, "stream": "Pumps"}, False),
            ({**base, "stream": ""}, False),
            ({**base, "stream": "p" * 65}, False),
            ({**base, "source": {"topic": "t", "partition": -1, "offset": 0}}, False),
        ]
    return out


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_files_are_valid_json_schema(name: str) -> None:
    Draft202012Validator.check_schema(load_schema(name))


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("transaction", VALID_TX),
        ("transaction_label", VALID_LABEL),
        ("sensor_reading", VALID_SENSOR),
        ("alert", VALID_ALERT),
    ],
)
def test_python_types_agree_with_json_schema(name: str, base: dict[str, Any]) -> None:
    validator = Draft202012Validator(load_schema(name), format_checker=FormatChecker())
    adapter = TypeAdapter(TYPES[name])
    for record, expected in _variants(base, name):
        by_schema = validator.is_valid(record)
        try:
            adapter.validate_json(json.dumps(record))
            by_type = True
        except ValidationError:
            by_type = False
        assert by_schema == expected, (record, "schema")
        assert by_type == expected, (record, "type")


def test_alert_rows_serialize_to_the_alert_contract() -> None:
    from datetime import datetime, timezone

    from pipeline.checkpointing.rows import AlertRow

    row = AlertRow(
        alert_key="k",
        run_id="live",
        stream="sensors",
        entity_id="pump-1",
        event_time=datetime(2020, 3, 9, tzinfo=timezone.utc),
        score=3.0,
        threshold=1.0,
        severity="medium",
        model_version="m@1",
        top_features=[{"feature": "Current", "observed": 2.0, "reconstructed": 1.0, "contribution": 2.5}],
        source_topic="s",
        source_partition=1,
        source_offset=9,
    )
    jsonschema.validate(row.to_wire(), load_schema("alert"), format_checker=FormatChecker())


def test_unknown_schema_name() -> None:
    with pytest.raises(KeyError):
        load_schema("nope")


def test_a_refused_event_time_is_quoted_in_the_error() -> None:
    """The dead letter's detail is this message: it showed the template's '{value!r}' instead of the value."""
    with pytest.raises(ValidationError) as err:
        TypeAdapter(Transaction).validate_python({**VALID_TX, "timestamp": "2024-05-01T00:34:40"})
    message = str(err.value)
    assert "event time '2024-05-01T00:34:40' is not an RFC 3339 date-time" in message and "{value" not in message
