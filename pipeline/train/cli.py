"""`pipeline train --stream NAME (--data PATH... | --topic T [--from ISO] [--to ISO])`: the steps between the
command line (pipeline/cli.py) and the trainer: stream file, data, labels, progress bars, registry, summary."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import typer
from tqdm import tqdm

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.streams.config import Stream, load_streams, streams_file_from_env
from pipeline.train.data import TrainingTable, read_files
from pipeline.train.history import (
    TrainOptions,
    check_trainable,
    labelled_anomalies,
    register_version,
    train_on_history,
)

DEFAULT_OUT = Path("var/models")


def output_dir(path: Path) -> Path:
    """--out, created and checked before training starts, not found unwritable after it."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: not writable")
    return path


def train_stream_command(
    stream_name: str,
    *,
    data: Sequence[Path],
    topic: str | None,
    from_time: str | None,
    to_time: str | None,
    bootstrap: str | None,
    streams_file: Path | None,
    out_dir: Path | None,
    options: TrainOptions,
    database_url: str | None,
    register: bool,
) -> None:
    if bool(data) == (topic is not None):
        raise ConfigError(
            "give the history as --data PATH (CSV/Parquet files or folders) or as --topic T"
            + (", not both" if data else "")
        )
    if topic is None and (from_time or to_time):
        raise ConfigError("--from/--to select a range of --topic")
    stream = load_streams(streams_file or streams_file_from_env()).stream(stream_name)
    check_trainable(stream)
    out = output_dir(out_dir or DEFAULT_OUT)
    settings = Settings()
    # labels and the registry live in the alert database: the one named, or DATABASE_URL when it is set
    db_url = database_url or (settings.database_url if "database_url" in settings.model_fields_set else None)
    if register and db_url is None:
        raise ConfigError("--register needs the database: pass --database-url or set DATABASE_URL")
    table = _history(stream, data, topic, from_time, to_time, bootstrap or settings.kafka_bootstrap)
    labelled = labelled_anomalies(db_url, stream.name, create=register) if db_url is not None else None
    bar = tqdm(total=options.epochs, desc=f"train {stream.name}", file=sys.stderr, unit="epoch")

    def progress(_epoch: int, train_loss: float, val_loss: float) -> None:
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        bar.update(1)

    try:
        trained = train_on_history(stream, table, out, options, labelled=labelled, progress=progress)
    finally:
        bar.close()
    card, data_card = trained.card, trained.card["data"]
    rows = data_card["rows"]
    skipped = "not checked (no database)" if rows["skipped_labelled"] is None else rows["skipped_labelled"]
    typer.echo(f"{stream.name}: {trained.path} (card {trained.path.with_suffix('.card.json')})")
    typer.echo(
        f"  {options.family}: {data_card['entities']} entities, "
        f"{data_card['first_time']} .. {data_card['last_time']}; rows: {rows['read']} read, {rows['train']} train, "
        f"{rows['held_out']} held out, labelled anomalies skipped: {skipped}"
        + (f", invalid records skipped: {rows['skipped_invalid']}" if rows["skipped_invalid"] else "")
    )
    typer.echo(
        f"  threshold {card['threshold']:.4g}, validation loss {card['metrics']['val_mse']:.4g}, "
        f"{card['metrics']['train_seconds']:.1f}s ({card['seconds_per_100k_windows']:.1f}s per 100k windows)"
    )
    if register and db_url is not None:  # (--register without a database was refused above)
        typer.echo(f"  registered as {register_version(trained.path, stream.name, db_url)}")


def _history(
    stream: Stream,
    data: Sequence[Path],
    topic: str | None,
    from_time: str | None,
    to_time: str | None,
    bootstrap: str | None,
) -> TrainingTable:
    if topic is None:
        return read_files(data, stream)
    from pipeline.replay.core import parse_range
    from pipeline.train.topic import read_topic

    if not bootstrap:
        raise ConfigError("--topic needs the broker: pass --bootstrap or set KAFKA_BOOTSTRAP")
    from_ms, to_ms = parse_range(from_time, to_time)
    bar = tqdm(desc=f"read {topic}", file=sys.stderr, unit="rec")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        return read_topic(stream, bootstrap, topic, from_ms=from_ms, to_ms=to_ms, progress=progress)
    finally:
        bar.close()
