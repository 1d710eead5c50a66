"""A stream's history as training rows: CSV/Parquet exports or decoded topic records, checked and split.

Rules (each broken one is a TrainingDataError naming the file, the row and the column):
- the columns are the stream's entity_key, time_field and every declared channel (others are ignored);
- channel cells are finite numbers; times are ISO-8601 text (no offset = UTC), epoch seconds, or a Parquet
  timestamp, within 1900-01-01 .. 2200-01-01 like served events; entity ids follow the wire rules;
- rows may come in any order: they are sorted by entity, then time (exports are rarely sorted), but two
  rows of one entity at the same time are rejected (which of them is the reading is not knowable);
- every entity has enough rows to warm up and still leave a held-out tail; at least two entities, since
  a new machine starts on the population's statistics and threshold.
CSV rows are named by file line (the header is line 1), Parquet rows by row number (the first is row 1).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import TypeAdapter, ValidationError

from models.lstm_forecast import held_out_start
from pipeline.checkpointing.rows import iso_utc
from pipeline.errors import PipelineError
from pipeline.streams.config import Stream
from schemas.types import EVENT_TIME_MAX, EVENT_TIME_MIN, EntityId

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
_ENTITY_ID: TypeAdapter[str] = TypeAdapter(EntityId)


class TrainingDataError(PipelineError):
    """Training data the model cannot learn from; the message names the file, row and column."""


@dataclass(frozen=True)
class Origin:
    """Where rows came from: a file (rows named by line or row number) or a topic partition (by offset)."""

    name: str
    unit: str  # "line" | "row" | "offset"


@dataclass
class TrainingTable:
    """One stream's rows: entity, event time, the declared channels in declaration order."""

    entity_ids: np.ndarray  # (N,) str objects
    ts: np.ndarray  # (N,) float64 epoch seconds
    values: np.ndarray  # (N, C) float64
    origin: np.ndarray  # (N,) index into `origins`
    position: np.ndarray  # (N,) int64 line, row or offset within its origin
    origins: list[Origin]
    skipped_invalid: dict[str, int] = field(default_factory=dict)  # topic records that failed decoding, by reason

    def __len__(self) -> int:
        return len(self.ts)

    def where(self, i: int) -> str:
        o = self.origins[int(self.origin[i])]
        return f"{o.name} {o.unit} {int(self.position[i])}"

    def take(self, idx: np.ndarray) -> TrainingTable:
        return TrainingTable(
            self.entity_ids[idx],
            self.ts[idx],
            self.values[idx],
            self.origin[idx],
            self.position[idx],
            self.origins,
            self.skipped_invalid,
        )


def concat(tables: Sequence[TrainingTable]) -> TrainingTable:
    origins: list[Origin] = []
    shifted = []
    for t in tables:
        shifted.append(t.origin + len(origins))
        origins.extend(t.origins)
    skipped: dict[str, int] = {}
    for t in tables:
        for reason, n in t.skipped_invalid.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return TrainingTable(
        np.concatenate([t.entity_ids for t in tables]),
        np.concatenate([t.ts for t in tables]),
        np.concatenate([t.values for t in tables]),
        np.concatenate(shifted),
        np.concatenate([t.position for t in tables]),
        origins,
        skipped,
    )


# -- files -------------------------------------------------------------------------------------------------
def training_files(paths: Sequence[Path]) -> list[Path]:
    """The CSV and Parquet files named by `paths` (files, or folders searched recursively), in order."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in CSV_SUFFIXES + PARQUET_SUFFIXES and p.is_file()
            )
            if not found:
                raise TrainingDataError(f"{path}: no .csv or .parquet files in this folder")
            out.extend(found)
        elif not path.exists():
            raise TrainingDataError(f"{path}: no such file or folder")
        elif path.suffix.lower() not in CSV_SUFFIXES + PARQUET_SUFFIXES:
            raise TrainingDataError(f"{path}: not a .csv or .parquet file")
        else:
            out.append(path)
    return out


def read_files(paths: Sequence[Path], stream: Stream) -> TrainingTable:
    return concat([read_file(p, stream) for p in training_files(paths)])


def read_file(path: Path, stream: Stream) -> TrainingTable:
    columns = [stream.entity_key, stream.time_field, *stream.channel_names]
    if path.suffix.lower() in PARQUET_SUFFIXES:
        origin, first = Origin(str(path), "row"), 1
        frame = _read_parquet(path, columns)
    else:
        origin, first = Origin(str(path), "line"), 2
        frame = _read_csv(path, columns)
    n = len(frame)
    if n == 0:
        raise TrainingDataError(f"{path}: no data rows")
    position = np.arange(first, first + n, dtype=np.int64)

    def where(row: int, column: str) -> str:
        return f"{path} {origin.unit} {first + row} column {column!r}"

    entities = _entity_ids(frame[stream.entity_key], where, stream.entity_key)
    ts = _epoch_seconds(frame[stream.time_field], where, stream.time_field)
    values = np.empty((n, len(stream.channel_names)), np.float64)
    for j, channel in enumerate(stream.channel_names):
        values[:, j] = _numbers(frame[channel], where, channel)
    return TrainingTable(entities, ts, values, np.zeros(n, np.int64), position, [origin])


def _missing(path: Path, have: Sequence[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in set(have)]
    if missing:
        raise TrainingDataError(
            f"{path}: column {missing[0]!r} is missing (the stream needs {', '.join(map(repr, columns))}; "
            f"the file has {', '.join(map(repr, have)) if have else 'no columns: is it empty?'})"
        )
    twice = [c for c in columns if list(have).count(c) > 1]
    if twice:
        raise TrainingDataError(f"{path}: column {twice[0]!r} appears {list(have).count(twice[0])} times in the header")


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """Comma- or semicolon-separated (SKAB exports use ';'), UTF-8 with or without a byte-order mark."""
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        header = f.readline()
    sep = ";" if header.count(";") > header.count(",") else ","
    _missing(path, next(csv.reader([header], delimiter=sep), []), columns)
    try:
        frame = pd.read_csv(
            path,
            sep=sep,
            encoding="utf-8-sig",
            # every column is read (no usecols): with usecols pandas accepts a row with more fields than the
            # header and shifts its cells, e.g. after an unquoted decimal comma; index_col=False keeps a
            # trailing separator on every line from turning the first column into an index
            index_col=False,
            dtype=object,  # each cell checked below, so a bad one is named instead of turning a column to text
            keep_default_na=False,
        )
    except pd.errors.ParserError as exc:
        ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if ragged:
            n_header, line, n_row = ragged.groups()
            raise TrainingDataError(
                f"{path} line {line}: {n_row} fields, the header has {n_header} (a separator inside a cell, e.g. "
                "an unquoted decimal comma?)"
            ) from None
        raise TrainingDataError(f"{path}: not a readable CSV: {str(exc).splitlines()[0]}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrainingDataError(f"{path}: not a readable CSV: {str(exc).splitlines()[0]}") from None
    return frame[columns]


def _read_parquet(path: Path, columns: list[str]) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
        raise TrainingDataError(f"{path}: not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    _missing(path, names, columns)
    return pd.read_parquet(path, columns=columns)


def _entity_ids(column: pd.Series, where: Any, name: str) -> np.ndarray:
    texts = np.array([_cell_text(v) for v in column.to_numpy(dtype=object)], dtype=object)
    for text in dict.fromkeys(texts.tolist()):
        try:
            _ENTITY_ID.validate_python(text)
        except ValidationError:
            i = int(np.flatnonzero(texts == text)[0])
            raise TrainingDataError(
                f"{where(i, name)}: {text!r} is not an entity id (1-64 of A-Z a-z 0-9 _ . : -, starting with a "
                "letter or digit, as the service requires)"
            ) from None
    return texts


def _cell_text(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # a numeric id column in Parquet
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def _numbers(column: pd.Series, where: Any, name: str) -> np.ndarray:
    kind = column.dtype
    if (
        pd.api.types.is_datetime64_any_dtype(kind)
        or pd.api.types.is_timedelta64_dtype(kind)
        or (isinstance(kind, pd.CategoricalDtype | pd.PeriodDtype | pd.IntervalDtype))
    ):  # a typed Parquet column that is not a measurement (its raw integers would train silently)
        raise TrainingDataError(f"{where(0, name)}: the column holds {kind} values, not numbers")
    if not pd.api.types.is_numeric_dtype(kind):
        column = column.astype(object)  # text (pandas' str dtype too): each cell parsed below
    raw = column.to_numpy(dtype=object) if column.dtype == object else column.to_numpy()
    if raw.dtype == object:
        parsed = pd.to_numeric(pd.Series(raw).map(_strip), errors="coerce").to_numpy(dtype=np.float64)
    else:
        parsed = raw.astype(np.float64)
    bad = ~np.isfinite(parsed)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        cell = raw[i]
        what = "is empty" if _cell_text(cell).strip() == "" else f"is {_shown(cell)}, not a finite number"
        raise TrainingDataError(f"{where(i, name)} {what}")
    return parsed


def _strip(v: object) -> object:
    return v.strip() if isinstance(v, str) else v


def _shown(v: object) -> str:
    """A cell for a message: 'abc', 1714521600, inf (not np.int64(1714521600) or np.float64(inf))."""
    return repr(v.item() if isinstance(v, np.generic) else v)


def _epoch_seconds(column: pd.Series, where: Any, name: str) -> np.ndarray:
    """ISO-8601 text (no offset: UTC), epoch seconds, or a Parquet timestamp -> float64 epoch seconds."""
    raw = column
    if pd.api.types.is_datetime64_any_dtype(column):
        parsed = pd.to_datetime(column, utc=True)
    elif pd.api.types.is_numeric_dtype(column):
        parsed = None
    else:
        text = column.map(_strip)
        numeric = pd.to_numeric(text, errors="coerce")
        # the column's first non-empty cell decides between epoch seconds and ISO-8601 text, so a bad cell
        # (or a cell of the other kind) is the one named, not the first row
        filled = text.map(lambda v: _cell_text(v).strip() != "").to_numpy()
        first = int(np.argmax(filled)) if filled.any() else 0
        if not pd.isna(numeric.iloc[first]):
            column, parsed = numeric, None
        else:
            parsed = pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce")
    if parsed is None:
        secs = column.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(secs)
    else:
        bad = parsed.isna().to_numpy()
        secs = np.zeros(len(column))
        if not bad.any():  # microseconds as integers first: exactly the event time a decoded record has
            micros = parsed.dt.tz_localize(None).astype("datetime64[us]").to_numpy().astype(np.int64)
            secs = micros / 1e6
    bad = bad | ~((secs >= EVENT_TIME_MIN) & (secs < EVENT_TIME_MAX))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        hint = " (epoch milliseconds? the column must hold seconds)" if 1e11 < secs[i] < 1e14 else ""
        raise TrainingDataError(
            f"{where(i, name)}: {_shown(raw.iloc[i])} is not a time between 1900 and 2200 "
            f"(ISO-8601, e.g. 2024-05-01T10:00:00Z, or epoch seconds){hint}"
        )
    return secs


# -- checks and the split ----------------------------------------------------------------------------------
MIN_HELD_OUT = 2  # held-out rows in all, below which no threshold can be calibrated (2 prediction errors)


@dataclass(frozen=True)
class Rows:
    """The rows a model trains on (sorted by entity, then time) and the held-out tail of each entity."""

    table: TrainingTable
    held_out: np.ndarray  # (N,) bool: the last rows of each entity (threshold calibration)
    rows_read: int
    skipped_labelled: int

    @property
    def entities(self) -> list[str]:
        return list(dict.fromkeys(self.table.entity_ids.tolist()))


def training_rows(
    table: TrainingTable,
    stream: Stream,
    *,
    labelled: set[tuple[str, float]],
    holdout: float,
    warmup: int,
) -> Rows:
    """Sort, reject duplicates, drop rows operators labelled as anomalies, check the minimums, split.

    warmup: rows an entity needs before its held-out tail (the model's window or burn-in and the entity's
    scaling); an entity needs ceil(warmup / (1 - holdout)) rows so that its tail starts after them."""
    if len(table) == 0:
        raise TrainingDataError("no rows to train on")
    _, codes = np.unique(table.entity_ids.astype(str), return_inverse=True)
    table = table.take(np.lexsort((table.ts, codes)))
    same = (table.entity_ids[1:] == table.entity_ids[:-1]) & (table.ts[1:] == table.ts[:-1])
    if same.any():
        i = int(np.flatnonzero(same)[0])
        raise TrainingDataError(
            f"{table.where(i + 1)} column {stream.time_field!r}: entity {table.entity_ids[i]!r} has a second row at "
            f"{iso_time(table.ts[i])} (the other: {table.where(i)}); drop or aggregate duplicate readings"
        )
    rows_read = len(table)
    if labelled:
        keep = np.fromiter(
            ((str(e), round(float(t), 6)) not in labelled for e, t in zip(table.entity_ids, table.ts, strict=True)),
            bool,
            rows_read,
        )
        table = table.take(np.flatnonzero(keep))
    skipped = rows_read - len(table)
    if len(table) == 0:
        raise TrainingDataError(
            f"no rows left: all {rows_read} rows are readings operators labelled as anomalies (alerts labelled tp "
            f"for stream {stream.name!r}); a model learns normal behaviour, so it needs unlabelled history"
        )
    starts = np.flatnonzero(np.r_[True, table.entity_ids[1:] != table.entity_ids[:-1]])
    counts = np.diff(np.r_[starts, len(table)])
    if len(starts) < 2:
        where = f"{table.where(0)} column {stream.entity_key!r}" if len(table) else f"column {stream.entity_key!r}"
        raise TrainingDataError(
            f"{where}: one entity only ({table.entity_ids[0]!r}); at least 2 are needed: a new entity is scored on "
            "the population's scaling and threshold until it has its own, so the model must see several"
        )
    minimum = int(np.ceil(warmup / (1.0 - holdout)))
    short = np.flatnonzero(counts < minimum)
    if len(short):
        k = int(short[0])
        raise TrainingDataError(
            f"{table.where(int(starts[k]))} column {stream.entity_key!r}: entity {table.entity_ids[starts[k]]!r} has "
            f"{counts[k]} rows; at least {minimum} are needed (its first {warmup} warm up the model and the entity's "
            f"scaling, and the last {holdout * 100:.4g} % are held out to calibrate the threshold)"
        )
    held_out = np.zeros(len(table), bool)
    for start, n in zip(starts.tolist(), counts.tolist(), strict=True):
        held_out[start + held_out_start(n, holdout) : start + n] = True
    if held_out.sum() < MIN_HELD_OUT:
        raise TrainingDataError(
            f"--holdout {holdout:g} holds out {int(held_out.sum())} of {len(table)} rows (the last {holdout:.1%} of "
            f"each entity's); at least {MIN_HELD_OUT} are needed to calibrate the threshold: raise --holdout or "
            "give more rows"
        )
    return Rows(table, held_out, rows_read, skipped)


def iso_time(ts: float) -> str:
    return iso_utc(datetime.fromtimestamp(ts, timezone.utc))
