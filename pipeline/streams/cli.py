"""`pipeline streams check [FILE]`: validate a stream file before the service reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.streams.config import (
    ENV_VAR,
    Stream,
    StreamsFileError,
    load_streams,
    parse_model_ref,
    streams_file_from_env,
)

streams_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Stream files: declare what is served.")


def register(app: typer.Typer) -> None:
    app.add_typer(streams_app, name="streams")


def summary(stream: Stream) -> str:
    parts = [f"topic {stream.topic}", stream.kind, f"entity {stream.entity_key}", f"time {stream.time_field}"]
    if stream.channels:
        context = len(stream.channels) - len(stream.scored_channels)
        parts.append(f"{len(stream.channels)} channels ({len(stream.scored_channels)} scored, {context} context)")
    parts.append(f"model {stream.model}")
    if stream.challenger:
        parts.append(f"challenger {stream.challenger}")
    return f"{stream.name}: {', '.join(parts)}"


def _check_model_files(stream: Stream) -> None:
    """A model named by file (a .pt path, bundled:KIND) is loaded and checked against the stream as `pipeline
    run` checks it (a bundled model with other channels passed here, then run refused it); a registry model
    is checked by `models promote` and at start, where the database is."""
    from pipeline.errors import ConfigError
    from pipeline.streams.serving import resolve_model

    for ref in (stream.model, stream.challenger):
        if ref is None or parse_model_ref(ref).source == "registry":
            continue
        try:
            resolve_model(stream, None, ref)
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


@streams_app.command()
def check(
    file: Annotated[
        Path | None, typer.Argument(help=f"stream file (TOML); default {ENV_VAR} or the bundled one")
    ] = None,
) -> None:
    """Validate a stream file: one line per stream (exit 0), or the first error naming its key (exit 2)."""
    from pipeline.cli import _settings

    try:
        streams = load_streams(file or streams_file_from_env())
    except StreamsFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    settings = _settings()
    for stream in streams.streams:  # what `pipeline run` would refuse at start with these settings
        clash = settings.read_topic_clash([stream.topic])
        if clash is not None:
            typer.echo(f"error: stream {stream.name!r}: {clash}", err=True)
            raise typer.Exit(2)
        _check_model_files(stream)
    for stream in streams.streams:
        typer.echo(summary(stream))
