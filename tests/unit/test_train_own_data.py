"""`pipeline train --stream NAME --data PATH`: a declared stream's model trained on CSV/Parquet history, its card,
and one-line errors (file, row, column) for every kind of bad training data."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from models.lstm_ae import SCORE_QUANTILES
from models.lstm_forecast import load_model
from pipeline.errors import ConfigError
from pipeline.streams.config import Stream, parse_streams
from pipeline.train.cli import train_stream_command
from pipeline.train.data import TrainingDataError, read_files, training_rows
from pipeline.train.history import TrainOptions, content_hash, train_on_history

PLANT = """
[[streams]]
name = "pumps"
topic = "plant.pumps"
kind = "sensors"
entity_key = "{entity}"
time_field = "timestamp"
model = "pumps@champion"
[[streams.channels]]
name = "vibration_rms"
unit = "mm/s"
min = 0.0
max = 50.0
[[streams.channels]]
name = "pressure"
[[streams.channels]]
name = "bearing_temp"
role = "context"
"""
START = datetime(2024, 5, 1, tzinfo=timezone.utc).timestamp()
FAST = TrainOptions(epochs=2)


def pumps_stream(entity_key: str = "device_id") -> Stream:
    return parse_streams(PLANT.format(entity=entity_key)).stream("pumps")


def pump_rows(entities: int = 3, rows: int = 200, *, seed: int = 0) -> list[dict[str, Any]]:
    """Normal pump readings every 10 s, one record per row (the sensor record layout)."""
    rng = np.random.default_rng(seed)
    out = []
    for e in range(entities):
        for i in range(rows):
            t = datetime.fromtimestamp(START + 10 * i, timezone.utc).isoformat().replace("+00:00", "Z")
            values = {
                "vibration_rms": float(5 + math.sin(i / 7 + e) + 0.1 * rng.normal()),
                "pressure": float(2 + 0.5 * math.cos(i / 11) + 0.05 * rng.normal()),
                "bearing_temp": float(60 + 0.01 * i + e),
            }
            out.append({"device_id": f"P{e + 1}", "timestamp": t, "values": values})
    return out


def write_csv(path: Path, rows: list[dict[str, Any]], entity_key: str = "device_id") -> Path:
    """repr() of each float: the file holds exactly the values a topic record would."""
    channels = list(rows[0]["values"])
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([entity_key, "timestamp", *channels, "operator_note"])
        for r in rows:
            w.writerow([r["device_id"], r["timestamp"], *(_cell(r["values"][c]) for c in channels), ""])
    return path


def _cell(v: object) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{"device_id": r["device_id"], "timestamp": r["timestamp"], **r["values"]} for r in rows])


def test_train_from_csv_writes_model_and_card(tmp_path: Path) -> None:
    stream = pumps_stream()
    table = read_files([write_csv(tmp_path / "pumps.csv", pump_rows())], stream)
    trained = train_on_history(stream, table, tmp_path / "out", FAST)
    card = trained.card
    assert trained.path == tmp_path / "out" / "pumps.pt" and trained.path.with_suffix(".card.json").exists()
    assert (card["stream"], card["stream_kind"], card["family"]) == ("pumps", "sensors", "lstm_forecast")
    assert [(c["name"], c["role"]) for c in card["channels"]] == [
        ("vibration_rms", "scored"),
        ("pressure", "scored"),
        ("bearing_temp", "context"),
    ]
    data = card["data"]
    assert (data["first_time"], data["last_time"]) == ("2024-05-01T00:00:00Z", "2024-05-01T00:33:10Z")
    # the tail of each entity (40 of 200 rows) is held out; no database, so labels were not checked
    assert data["entities"] == 3
    assert data["rows"] == {"read": 600, "train": 480, "held_out": 120, "skipped_labelled": None, "skipped_invalid": {}}
    assert set(card["metrics"]["val_score_quantiles"]) == {str(q) for q in SCORE_QUANTILES}
    assert card["threshold"] > card["metrics"]["val_score_quantiles"]["0.99"] > 0
    assert math.isfinite(card["metrics"]["val_mse"]) and card["torch_version"]
    assert card["training"]["clip"] == 1.0 and card["training"]["tbptt"] > 1  # clipped, truncated BPTT
    stats = card["channel_stats"]["vibration_rms"]
    assert 4.5 < stats["mean"] < 5.5 and stats["outside_range_hint"] == 0 and "0.99" in stats["quantiles"]
    assert card["training_windows"] == 480 * FAST.epochs and card["seconds_per_100k_windows"] > 0
    # the model serves the declared channels, scoring only the scored ones; the hash covers weights + card
    model = load_model(trained.path)
    assert model.card["feature_names"] == ["vibration_rms", "pressure", "bearing_temp"]
    assert model.config.scored() == [0, 1]
    assert content_hash(model) == card["content_sha256"]
    # the card names the threshold knobs chosen with the family on validation, and the service serves them
    from pipeline.evaluate.skab import SkabConfig
    from pipeline.scoring.factory import build_scorer
    from pipeline.scoring.knobs import ThresholdKnobs

    assert ThresholdKnobs(**card["threshold_knobs"]) == SkabConfig().threshold
    served = build_scorer("sensors", model, knobs=ThresholdKnobs())
    assert served.threshold.knobs == SkabConfig().threshold  # type: ignore[union-attr]
    assert served.threshold.knobs.z == 2.5 and served.threshold.knobs.smoothing == 0.3  # type: ignore[union-attr]


def test_autoencoder_family_calibrates_on_the_held_out_tail(tmp_path: Path) -> None:
    stream = pumps_stream()
    table = read_files([write_csv(tmp_path / "pumps.csv", pump_rows())], stream)
    card = train_on_history(stream, table, tmp_path, TrainOptions(family="lstm_ae", epochs=1)).card
    window = card["config"]["window"]
    assert card["training"]["clip"] == 1.0 and list(card["config"]["score_features"]) == [0, 1]
    # training windows: each entity's head rows that have min_history events (160 - 7 per entity)
    assert card["n_windows"] == 3 * (160 - 7) and window == 32
    assert set(card["metrics"]["val_score_quantiles"]) == {str(q) for q in SCORE_QUANTILES}
    assert "threshold_knobs" not in card  # chosen for the forecaster; an autoencoder is served the configured knobs


def test_files_folders_parquet_and_order_give_the_same_rows(tmp_path: Path) -> None:
    """One CSV == the same rows shuffled over a folder holding a CSV and a Parquet file."""
    stream = pumps_stream()
    rows = pump_rows()
    single = read_files([write_csv(tmp_path / "all.csv", rows)], stream)
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    folder = tmp_path / "export"
    folder.mkdir()
    write_csv(folder / "part-1.csv", shuffled[:250])
    frame(shuffled[250:]).to_parquet(folder / "part-2.parquet")
    parts = read_files([folder], stream)
    a = training_rows(single, stream, labelled=set(), holdout=0.2, warmup=16)
    b = training_rows(parts, stream, labelled=set(), holdout=0.2, warmup=16)
    assert a.table.entity_ids.tolist() == b.table.entity_ids.tolist()
    np.testing.assert_array_equal(a.table.ts, b.table.ts)
    np.testing.assert_array_equal(a.table.values, b.table.values)
    np.testing.assert_array_equal(a.held_out, b.held_out)
    assert b.table.where(0).startswith(str(folder / "part-"))


def test_rows_operators_labelled_are_skipped(tmp_path: Path) -> None:
    stream = pumps_stream()
    table = read_files([write_csv(tmp_path / "pumps.csv", pump_rows())], stream)
    labelled = {("P2", START + 10 * i) for i in (50, 51, 52)} | {("P9", START)}  # P9: not in the data
    card = train_on_history(stream, table, tmp_path, FAST, labelled=labelled).card
    assert card["data"]["rows"]["skipped_labelled"] == 3
    assert card["data"]["rows"]["train"] + card["data"]["rows"]["held_out"] == 597


def rows_with(change: dict[str, Any], at: int = 5) -> list[dict[str, Any]]:
    rows = pump_rows()
    rows[at] = {**rows[at], **change}
    return rows


BAD_CSV = [
    pytest.param(
        pump_rows(),
        {"drop": "pressure"},
        "pumps.csv: column 'pressure' is missing (the stream needs",
        id="missing channel",
    ),
    pytest.param(
        rows_with({"values": {**pump_rows()[5]["values"], "pressure": "n/a"}}),
        {},
        "pumps.csv line 7 column 'pressure' is 'n/a', not a finite number",
        id="non-numeric cell",
    ),
    pytest.param(
        rows_with({"values": {**pump_rows()[5]["values"], "pressure": ""}}),
        {},
        "pumps.csv line 7 column 'pressure' is empty",
        id="empty cell",
    ),
    pytest.param(
        rows_with({"values": {**pump_rows()[5]["values"], "vibration_rms": "inf"}}),
        {},
        "pumps.csv line 7 column 'vibration_rms' is 'inf', not a finite number",
        id="infinite",
    ),
    pytest.param(
        rows_with({"timestamp": "yesterday"}),
        {},
        "pumps.csv line 7 column 'timestamp': 'yesterday' is not a time between 1900 and 2200",
        id="bad time",
    ),
    pytest.param(
        rows_with({"timestamp": "2262-01-01T00:00:00Z"}),
        {},
        "pumps.csv line 7 column 'timestamp': '2262-01-01T00:00:00Z' is not a time between 1900 and 2200",
        id="time out of range",
    ),
    pytest.param(
        rows_with({"device_id": "pump #1"}),
        {},
        "pumps.csv line 7 column 'device_id': 'pump #1' is not an entity id",
        id="bad entity id",
    ),
    pytest.param(
        rows_with({"timestamp": pump_rows()[3]["timestamp"]}),
        {},
        "pumps.csv line 7 column 'timestamp': entity 'P1' has a second row at 2024-05-01T00:00:30Z (the other: "
        "pumps.csv line 5); drop or aggregate duplicate readings",
        id="duplicate time",
    ),
    pytest.param(
        pump_rows()[:400] + pump_rows()[400:410],
        {},
        "pumps.csv line 402 column 'device_id': entity 'P3' has 10 rows; at least 20 are needed (its first 16 warm up",
        id="too few rows",
    ),
    pytest.param(
        pump_rows(entities=1),
        {},
        "pumps.csv line 2 column 'device_id': one entity only ('P1'); at least 2 are needed",
        id="one entity",
    ),
]


@pytest.mark.parametrize("rows, edit, message", BAD_CSV)
def test_bad_training_data_names_file_row_and_column(
    tmp_path: Path, rows: list[dict[str, Any]], edit: dict[str, str], message: str
) -> None:
    stream = pumps_stream()
    path = write_csv(tmp_path / "pumps.csv", rows)
    if "drop" in edit:
        pd.read_csv(path).drop(columns=[edit["drop"]]).to_csv(path, index=False)
    with pytest.raises(TrainingDataError) as err:
        train_on_history(stream, read_files([path], stream), tmp_path, FAST)
    text = str(err.value)
    assert text.startswith(str(tmp_path)) and "\n" not in text
    assert message in text.replace(f"{tmp_path}/", "")


def test_bad_paths(tmp_path: Path) -> None:
    stream = pumps_stream()
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for path, message in (
        (tmp_path / "absent.csv", "no such file or folder"),
        (tmp_path / "empty", "no .csv or .parquet files in this folder"),
        (tmp_path / "notes.txt", "not a .csv or .parquet file"),
    ):
        with pytest.raises(TrainingDataError, match=message):
            read_files([path], stream)


def test_parquet_rows_are_named_by_row_number(tmp_path: Path) -> None:
    stream = pumps_stream()
    bad = frame(rows_with({"values": {**pump_rows()[5]["values"], "pressure": float("nan")}}))
    bad.to_parquet(tmp_path / "pumps.parquet")
    with pytest.raises(TrainingDataError, match=r"pumps.parquet row 6 column 'pressure' is empty"):
        read_files([tmp_path / "pumps.parquet"], stream)


def _pipeline(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def test_cli_trains_and_reports_errors_in_one_line(tmp_path: Path) -> None:
    """Through the installed entry point: a summary on success, exit 2 with one line (no traceback) on bad data."""
    streams_file = tmp_path / "plant.toml"
    streams_file.write_text(PLANT.format(entity="device_id"))
    data = write_csv(tmp_path / "pumps.csv", pump_rows())
    common = ("--stream", "pumps", "--streams-file", str(streams_file), "--epochs", "1", "--out", str(tmp_path / "m"))
    done = _pipeline(*common, "--data", str(data), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"pumps: {tmp_path / 'm' / 'pumps.pt'}") and "train pumps" in done.stderr
    assert "rows: 600 read, 480 train, 120 held out" in done.stdout
    write_csv(data, rows_with({"values": {**pump_rows()[5]["values"], "pressure": "n/a"}}))
    done = _pipeline(*common, "--data", str(data), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {data} line 7 column 'pressure' is 'n/a', not a finite number"]


def test_history_comes_from_files_or_a_topic() -> None:
    for data, topic, end in (([], None, "--topic T$"), ([Path("pumps.csv")], "plant.pumps", "--topic T, not both$")):
        with pytest.raises(ConfigError, match=f"give the history as --data PATH .* or as {end}"):
            train_stream_command(
                "pumps",
                data=data,
                topic=topic,
                from_time=None,
                to_time=None,
                bootstrap=None,
                streams_file=None,
                out_dir=None,
                options=FAST,
                database_url=None,
                register=False,
            )


# -- faults found by probing the CLI (2026-12-01): each was a traceback or silently wrong training data -------
def _line(path: Path, number: int, change: Any) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = change(lines[number - 1])
    path.write_text("".join(lines))


def test_a_row_with_more_fields_than_the_header_is_an_error_not_a_shift(tmp_path: Path) -> None:
    """An unquoted decimal comma used to move every later cell of the row one column left (exit 0)."""
    stream = pumps_stream()
    path = write_csv(tmp_path / "pumps.csv", pump_rows())
    _line(path, 7, lambda line: line.replace(".", ",", 1))  # 5.84... -> 5,84...: one more field
    with pytest.raises(TrainingDataError) as err:
        read_files([path], stream)
    assert str(err.value) == (
        f"{path} line 7: 7 fields, the header has 6 (a separator inside a cell, e.g. an unquoted decimal comma?)"
    )
    # a separator at the end of every line (a common export) is not a shift either: same rows as the clean file
    clean = read_files([write_csv(tmp_path / "clean.csv", pump_rows())], stream)
    trailing = write_csv(tmp_path / "trailing.csv", pump_rows())
    trailing.write_text("".join(line.rstrip("\n") + ",\n" for line in trailing.read_text().splitlines()))
    assert np.array_equal(read_files([trailing], stream).values, clean.values)


def test_a_column_twice_in_the_header_is_an_error(tmp_path: Path) -> None:
    stream = pumps_stream()
    path = write_csv(tmp_path / "pumps.csv", pump_rows())
    _line(path, 1, lambda line: line.replace("operator_note", "pressure"))
    with pytest.raises(TrainingDataError, match=r"pumps.csv: column 'pressure' appears 2 times in the header"):
        read_files([path], stream)


def test_a_typed_non_numeric_parquet_column_is_not_a_channel(tmp_path: Path) -> None:
    """A timestamp column under a channel's name used to train on its raw nanosecond counts."""
    stream = pumps_stream()
    df = frame(pump_rows())
    df["pressure"] = pd.to_datetime(df["timestamp"], utc=True)
    df.to_parquet(tmp_path / "pumps.parquet")
    with pytest.raises(TrainingDataError, match=r"pumps.parquet row 1 column 'pressure': the column holds datetime64"):
        read_files([tmp_path / "pumps.parquet"], stream)


def test_a_folder_named_like_a_csv_is_searched_not_read(tmp_path: Path) -> None:
    stream = pumps_stream()
    (tmp_path / "data" / "2024.csv").mkdir(parents=True)
    write_csv(tmp_path / "data" / "2024.csv" / "part1.csv", pump_rows())
    assert len(read_files([tmp_path / "data"], stream)) == 600


def test_a_bad_cell_in_an_epoch_time_column_is_the_one_named(tmp_path: Path) -> None:
    stream = pumps_stream()
    rows = [{**r, "timestamp": str(int(START) + 10 * (i % 200))} for i, r in enumerate(pump_rows())]
    path = write_csv(tmp_path / "pumps.csv", rows)
    assert len(read_files([path], stream)) == 600  # epoch seconds read as such
    _line(path, 7, lambda line: line.replace(str(int(START) + 50), "", 1))
    with pytest.raises(TrainingDataError, match=r"pumps.csv line 7 column 'timestamp': '' is not a time"):
        read_files([path], stream)
    _line(path, 7, lambda line: line.replace("P1,,", "P1,2024-05-01T00:00:50Z,", 1))  # ISO among epoch seconds
    with pytest.raises(TrainingDataError, match=r"pumps.csv line 7 column 'timestamp': '2024-05-01T00:00:50Z' is"):
        read_files([path], stream)


def test_no_rows_left_after_the_labelled_ones_and_too_small_a_holdout(tmp_path: Path) -> None:
    stream = pumps_stream()
    table = read_files([write_csv(tmp_path / "pumps.csv", pump_rows(rows=40))], stream)
    every_row = {(str(e), round(float(t), 6)) for e, t in zip(table.entity_ids, table.ts, strict=True)}
    with pytest.raises(TrainingDataError, match=r"no rows left: all 120 rows are readings operators labelled"):
        training_rows(table, stream, labelled=every_row, holdout=0.2, warmup=16)
    with pytest.raises(TrainingDataError, match=r"--holdout 0.01 holds out 0 of 120 rows .* at least 2 are needed"):
        training_rows(table, stream, labelled=set(), holdout=0.01, warmup=16)
    # the share is printed as given (0.999 read "the last 100%")
    with pytest.raises(TrainingDataError, match=r"at least 16000 are needed .* the last 99.9 % are held out"):
        training_rows(table, stream, labelled=set(), holdout=0.999, warmup=16)


def test_out_that_cannot_be_written_fails_before_training(tmp_path: Path) -> None:
    streams_file = tmp_path / "plant.toml"
    streams_file.write_text(PLANT.format(entity="device_id"))
    data = write_csv(tmp_path / "pumps.csv", pump_rows())
    (tmp_path / "afile").write_text("x")
    common = ("--stream", "pumps", "--streams-file", str(streams_file), "--data", str(data), "--epochs", "1")
    done = _pipeline(*common, "--out", str(tmp_path / "afile"), cwd=tmp_path)
    assert done.returncode == 2 and "train pumps" not in done.stderr  # no progress bar: refused before training
    assert done.stderr.strip().splitlines() == [f"error: --out {tmp_path / 'afile'}: exists and is not a folder"]


def test_epoch_milliseconds_get_a_hint_and_an_empty_family_is_refused(tmp_path: Path) -> None:
    stream = pumps_stream()
    rows = [{**r, "timestamp": str((int(START) + 10 * (i % 200)) * 1000)} for i, r in enumerate(pump_rows())]
    with pytest.raises(TrainingDataError, match=r"line 2 .* \(epoch milliseconds\? the column must hold seconds\)"):
        read_files([write_csv(tmp_path / "pumps.csv", rows)], stream)
    table = read_files([write_csv(tmp_path / "ok.csv", pump_rows())], stream)
    with pytest.raises(ConfigError, match=r"--family '': expected one of"):
        train_on_history(stream, table, tmp_path, TrainOptions(family="", epochs=1))


def test_a_payments_stream_is_refused_before_its_history_is_read(tmp_path: Path) -> None:
    """A probe's `train --stream cards` read the whole file, migrated the database and showed a progress bar
    before saying that payments streams are not trained this way."""
    streams_file = tmp_path / "pay.toml"
    streams_file.write_text(
        '[[streams]]\nname = "cards"\ntopic = "p"\nkind = "transactions"\nentity_key = "card_id"\n'
        'time_field = "ts"\nmodel = "bundled:transactions"\n'
    )
    missing = tmp_path / "not-read.csv"
    done = _pipeline("--stream", "cards", "--streams-file", str(streams_file), "--data", str(missing), cwd=tmp_path)
    assert done.returncode == 2 and "train cards" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: stream 'cards' is transactions: training on your own history is for sensors streams; a "
        "transactions model comes from `pipeline evaluate --format transactions --save-model`"
    ]


def test_register_on_a_new_sqlite_database_creates_it_and_without_register_a_missing_one_is_refused(
    tmp_path: Path,
) -> None:
    """README step 3 (`train ... --register`) said "no database ... `pipeline run` creates it" on a fresh
    SQLite URL; `models register` creates it, so `train --register` does too. Reading labels alone from a
    path that is not there stays an error (a mistyped path would read as "no labels")."""
    streams_file = tmp_path / "plant.toml"
    streams_file.write_text(PLANT.format(entity="device_id"))
    data = write_csv(tmp_path / "pumps.csv", pump_rows())
    common = ("--stream", "pumps", "--streams-file", str(streams_file), "--epochs", "1", "--data", str(data))
    db = tmp_path / "new" / "alerts.db"
    url = f"sqlite:///{db}"
    done = _pipeline(*common, "--out", str(tmp_path / "a"), "--database-url", url, cwd=tmp_path)
    assert done.returncode == 2 and f"no database at {db}" in done.stderr and not db.exists()
    done = _pipeline(*common, "--out", str(tmp_path / "b"), "--database-url", url, "--register", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "labelled anomalies skipped: 0" in done.stdout and "registered as pumps-v1" in done.stdout
