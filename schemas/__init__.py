"""Wire contracts: JSON Schema files shipped as package data, plus the Python types that mirror them.

The JSON files are the contract other teams code against; `schemas.types` are the fast validators the
processor uses on the hot path. tests/unit/test_schemas.py keeps the two in agreement.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_NAMES = ("transaction", "transaction_label", "sensor_reading", "alert")


@cache
def load_schema(name: str) -> dict[str, Any]:
    if name not in SCHEMA_NAMES:
        raise KeyError(f"unknown schema {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    text = resources.files(__name__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


__all__ = ["SCHEMA_NAMES", "load_schema"]
