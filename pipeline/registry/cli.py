"""`pipeline models register|list|show|promote|rollback|delete|drift|compare`: the model registry from the
command line. Errors are one line and exit 2; `drift` exits 1 when a figure is above its limit, so a
scheduler can trigger retraining."""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.registry.registry import (
    CHALLENGER,
    CHAMPION,
    ModelRegistry,
    ModelVersion,
    RegistryError,
    channel_mismatch,
)

if TYPE_CHECKING:
    from pipeline.registry import compare as comparison
    from pipeline.sinks.registry import SqlRegistryStore
    from pipeline.streams.config import Stream

models_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Model versions per stream: register, list, show, promote, roll back, delete; drift and compare.",
)
out = Console()
err = Console(stderr=True)

DbOpt = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy URL; default DATABASE_URL")]
StreamsFileOpt = Annotated[
    Path | None, typer.Option("--streams-file", help="stream file; default PIPELINE_STREAMS_FILE or the bundled one")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON on stdout")]
SinceOpt = Annotated[str, typer.Option("--since", help="ISO time or age: 15m, 2h, 7d")]


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


@contextmanager
def _store(database_url: str | None, *, existing: bool = True) -> Iterator[SqlRegistryStore]:
    """existing=False for `register` only: the first version may come before the service ever ran."""
    from pipeline.sinks.registry import SqlRegistryStore

    store = SqlRegistryStore.connect(database_url or Settings().database_url, existing=existing)
    try:
        yield store
    finally:
        store.dispose()


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _version_json(model: ModelVersion, aliases: list[str]) -> dict[str, Any]:
    return {
        "version": model.version,
        "stream": model.stream,
        "family": model.family,
        "created_at": model.created_at.isoformat(),
        "content_hash": model.content_hash,
        "size": model.size,
        "aliases": aliases,
        "card": model.card,
    }


@models_app.command("register")
def register_cmd(
    path: Annotated[Path, typer.Argument(help="a checkpoint file (.pt) written by `pipeline train`")],
    stream: Annotated[str, typer.Option("--stream", help="the stream (registry name) it serves")],
    streams_file: StreamsFileOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Store a checkpoint as a new version of a stream (the same file again: the existing version). Where the
    stream file declares the stream, the checkpoint must fit it as `pipeline run` checks it."""
    _check_registered(path, stream, streams_file)
    with _store(database_url, existing=False) as store:
        version = ModelRegistry(store).register(path, stream)
    typer.echo(version)


def _check_registered(path: Path, stream: str, streams_file: Path | None) -> None:
    """A probe registered a chillers checkpoint as a pumps version (and pumps as chillers): refused here when
    the stream file declares the stream; a stream it does not declare is noted (a version may be registered
    before its stream is declared)."""
    from models.lstm_forecast import load_model
    from pipeline.streams.config import ENV_VAR

    spec = _stream_spec(stream, streams_file)
    if spec is None:
        if streams_file is not None or os.environ.get(ENV_VAR, "").strip():
            typer.echo(f"note: the stream file declares no stream {stream!r}; channels not checked", err=True)
        return
    if not spec[0].channels:
        return
    try:
        checkpoint = load_model(path)
    except Exception:  # noqa: BLE001 - unreadable: `register` names the file's fault itself
        return
    _check_served(spec, checkpoint, path.name, "registered")


@models_app.command("list")
def list_cmd(
    stream: Annotated[str | None, typer.Option("--stream", help="only this stream")] = None,
    as_json: JsonOpt = False,
    database_url: DbOpt = None,
) -> None:
    """Model versions, oldest first per stream, with the aliases that name them."""
    with _store(database_url) as store:
        registry = ModelRegistry(store)
        models = registry.list(stream)
        named = _alias_names(registry, stream)
    if as_json:
        _print_json(
            [{k: v for k, v in _version_json(m, named.get(m.version, [])).items() if k != "card"} for m in models]
        )
        return
    table = Table(title=f"{len(models)} model versions", box=box.SIMPLE)
    for col in ("version", "aliases", "family", "created", "channels", "threshold", "size"):
        table.add_column(col, no_wrap=True)
    for m in models:
        threshold = m.card.get("threshold")
        table.add_row(
            m.version,
            ", ".join(named.get(m.version, [])),
            m.family,
            m.created_at.strftime("%Y-%m-%d"),
            str(len(m.channels)),
            f"{threshold:.4g}" if isinstance(threshold, int | float) else "",
            f"{m.size / 1024:.0f} KiB",
        )
    # at its full width even in a narrow terminal or a pipe (80 columns): a version id cut to "pumps-…" cannot
    # be copied into promote, show or delete
    wide = max(out.width, Measurement.get(out, out.options.update_width(10_000), table).maximum)
    Console(width=wide, file=out.file, force_terminal=out.is_terminal).print(table)


def _alias_names(registry: ModelRegistry, stream: str | None) -> dict[str, list[str]]:
    named: dict[str, list[str]] = {}
    for a in registry.aliases(stream):
        named.setdefault(a.version, []).append(a.alias)
    return named


@models_app.command("show")
def show_cmd(
    version: Annotated[str, typer.Argument(help="a version (pumps-v3) or STREAM@ALIAS")],
    as_json: JsonOpt = False,
    database_url: DbOpt = None,
) -> None:
    """A version's metadata and model card."""
    with _store(database_url) as store:
        registry = ModelRegistry(store)
        model = registry.resolve(version).model
        aliases = _alias_names(registry, model.stream).get(model.version, [])
    info = _version_json(model, aliases)
    if as_json:
        _print_json(info)
        return
    table = Table(title=model.version, show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        if key != "card":
            table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    out.print(table)
    out.print_json(json.dumps(model.card, default=str))


@models_app.command("promote")
def promote_cmd(
    version: Annotated[str, typer.Argument(help="the version to promote, e.g. pumps-v3")],
    stream: Annotated[str, typer.Option("--stream", help="the stream (registry name) it will serve")],
    challenger: Annotated[bool, typer.Option("--challenger", help="promote to challenger (shadow) instead")] = False,
    channels: Annotated[
        str | None, typer.Option("--channels", help="comma-separated channels the stream needs (default: its file)")
    ] = None,
    streams_file: StreamsFileOpt = None,
    by: Annotated[str | None, typer.Option("--by", help="who promotes (default: the login name)")] = None,
    database_url: DbOpt = None,
) -> None:
    """Make a version the stream's champion (or challenger). Refused when its channels differ from the stream's."""
    alias = CHALLENGER if challenger else CHAMPION
    with _store(database_url) as store:
        registry = ModelRegistry(store)
        # a --streams-file named on purpose must be the stream's own file
        spec = None if channels is not None else _stream_spec(stream, streams_file, refuse="promoted")
        expected, source = _expected_channels(registry, stream, channels, spec)
        if spec is not None:
            _check_as_served(registry, version, stream, spec)
        shadowing = registry.current(stream, CHALLENGER) if alias == CHAMPION else None
        state = registry.promote(version, stream, alias, expected_channels=expected, by=by or _login())
    checked = f"channels checked against {source}" if expected is not None else "no channels to check against"
    typer.echo(f"{stream}@{alias} -> {state.version} (generation {state.generation}; {checked})")
    if shadowing is not None and shadowing.version == state.version:
        typer.echo(f"{stream}@{CHALLENGER} cleared: {state.version} is the champion now, nothing shadows it")


def _expected_channels(
    registry: ModelRegistry, stream: str, channels: str | None, spec: tuple[Stream, Path] | None
) -> tuple[list[str] | None, str]:
    """The channels a version must have to serve `stream`, and where they came from: --channels, else the
    stream file's stream `spec`, else the current champion's card; (None, '') when there is nothing to compare
    with."""
    if channels is not None:
        names = [c.strip() for c in channels.split(",") if c.strip()]
        if not names:
            raise ConfigError("--channels: give at least one channel name")
        return names, "--channels"
    if spec is not None and spec[0].channels:
        return spec[0].channel_names, f"the stream file {spec[1]}"
    champion = registry.current(stream, CHAMPION)
    if champion is not None:
        return registry.show(champion.version).channels, f"the champion {champion.version}"
    return None, ""


def _check_as_served(registry: ModelRegistry, version: str, stream: str, spec: tuple[Stream, Path]) -> None:
    """The rest of the stream file's check, as `pipeline run` makes it at start: channel roles (a version that
    scores a channel the file declares as context passed the channel-name check, then the service refused to
    start). Only where promote's own checks pass (the version exists, is the stream's, has its channels)."""
    if not spec[0].channels:
        return
    try:
        model = registry.show(version)
        if model.stream != stream or channel_mismatch(model.channels, spec[0].channel_names) is not None:
            return  # promote refuses it, naming the stream or the channels
        checkpoint = registry.load(version)
    except RegistryError:
        return
    _check_served(spec, checkpoint, version, "promoted")


def _check_served(spec: tuple[Stream, Path], checkpoint: Any, version: str, refused: str) -> None:
    """`pipeline run`'s check of a model against its declared stream, refusing with the stream file named."""
    from pipeline.streams.serving import check_channels

    try:
        check_channels(spec[0], checkpoint.card, checkpoint.config.scored(), version)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (stream file {spec[1]}); nothing was {refused}") from None


def _stream_spec(stream: str, streams_file: Path | None, *, refuse: str | None = None) -> tuple[Stream, Path] | None:
    """The stream file's stream named `stream`, or the one whose model is `stream`@ALIAS in the registry.
    refuse: where `streams_file` was named and declares no such stream, a ConfigError ending "nothing was
    <refuse>" instead of None."""
    from pipeline.streams.config import load_streams, streams_file_from_env

    path = streams_file or streams_file_from_env()
    declared = load_streams(path).streams
    for s in declared:
        if s.name == stream:
            return s, path
    for s in declared:
        ref = s.model_ref
        if ref.source == "registry" and ref.name == stream:
            return s, path
    if refuse is not None and streams_file is not None:
        raise ConfigError(
            f"--streams-file {streams_file} declares no stream {stream!r} and none whose model is "
            f"{stream}@ALIAS (its streams: {', '.join(s.name for s in declared)}); nothing was {refuse}"
        )
    return None


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user database entry (e.g. a container's arbitrary uid)
        return "operator"


@models_app.command("rollback")
def rollback_cmd(
    stream: Annotated[str, typer.Option("--stream", help="the stream (registry name)")],
    challenger: Annotated[bool, typer.Option("--challenger", help="roll back the challenger instead")] = False,
    by: Annotated[str | None, typer.Option("--by", help="who rolls back (default: the login name)")] = None,
    database_url: DbOpt = None,
) -> None:
    """Point the stream's champion (or challenger) back at the version it had before its last promotion."""
    alias = CHALLENGER if challenger else CHAMPION
    with _store(database_url) as store:
        state = ModelRegistry(store).rollback(stream, alias, by=by or _login())
    typer.echo(f"{stream}@{alias} -> {state.version} (generation {state.generation})")


@models_app.command("delete")
def delete_cmd(
    version: Annotated[str, typer.Argument(help="the version to delete")],
    database_url: DbOpt = None,
) -> None:
    """Delete a version (refused while it is a champion or challenger)."""
    with _store(database_url) as store:
        ModelRegistry(store).delete(version)
    typer.echo(f"deleted {version}")


@models_app.command("drift")
def drift_cmd(
    stream: Annotated[str, typer.Option("--stream", help="the stream (registry name)")],
    limit: Annotated[
        float | None, typer.Option("--limit", help="PSI above which the command exits 1 (default: a shift, > 0.25)")
    ] = None,
    since: SinceOpt = "24h",
    bootstrap: Annotated[
        str | None, typer.Option("--bootstrap", help="Kafka bootstrap: also measure input drift on the topic's tail")
    ] = None,
    topic: Annotated[
        str | None, typer.Option("--topic", help="the stream's topic (default: from the stream file)")
    ] = None,
    records: Annotated[
        int, typer.Option("--records", min=1, help="input drift over the topic's last N records")
    ] = 5000,
    streams_file: StreamsFileOpt = None,
    as_json: JsonOpt = False,
    database_url: DbOpt = None,
) -> None:
    """Live scores (and, with --bootstrap, inputs) of the stream against its champion's card: PSI and the
    standardized mean shift per channel. Exit 1 when a PSI is above --limit, 0 otherwise, 2 on errors."""
    from pipeline.alerts.cli import parse_since
    from pipeline.registry import drift

    limit = drift.SHIFT_ABOVE if limit is None else limit
    t0 = parse_since(since)
    with _store(database_url) as store:
        registry = ModelRegistry(store)
        champion = registry.current(stream, CHAMPION)
        if champion is None:
            raise RegistryError(f"stream {stream!r} has no champion (pipeline models promote V --stream {stream})")
        card = registry.show(champion.version).card
        scores = store.version_scores(champion.version, stream=stream, since=t0)
    figures: list[dict[str, Any]] = []
    notes: list[str] = []
    if scores:
        try:
            value = drift.score_psi(scores, card)
        except ValueError as exc:
            raise RegistryError(f"{champion.version}: {exc}") from None
        figures.append({"figure": "score PSI", "n": len(scores), "psi": value, "reading": drift.reading(value)})
    else:
        notes.append(f"no score samples of {champion.version} since {t0:%Y-%m-%d %H:%M} UTC")
    if bootstrap is None:
        notes.append("input drift skipped: give --bootstrap to read the topic's last records")
    else:
        figures += _input_figures(card, bootstrap, topic or _stream_topic(stream, streams_file), records, notes)
    notes.append("warming-up share: exported by the running service")
    if not figures:
        raise RegistryError(f"nothing to measure for {stream}: " + "; ".join(notes[:-1]))
    over = [f for f in figures if f["psi"] is not None and f["psi"] > limit]
    if as_json:
        _print_json({"stream": stream, "version": champion.version, "limit": limit, "figures": figures, "notes": notes})
    else:
        table = Table(title=f"drift of {stream} ({champion.version}) since {t0:%Y-%m-%d %H:%M} UTC; limit {limit:g}")
        for col in ("figure", "n", "PSI", "reading", "mean shift (std)"):
            table.add_column(col)
        for f in figures:
            table.add_row(
                f["figure"],
                str(f["n"]),
                "" if f["psi"] is None else f"{f['psi']:.3f}",
                f["reading"],
                f"{f['mean_shift']:+.2f}" if "mean_shift" in f else "",
            )
        out.print(table)
        for note in notes:
            err.print(f"note: {note}")
    if over:
        raise typer.Exit(1)


def _stream_topic(stream: str, streams_file: Path | None) -> str:
    spec = _stream_spec(stream, streams_file)
    if spec is None:
        raise ConfigError(f"stream {stream!r} is not in the stream file: give --topic")
    return spec[0].topic


def _input_figures(
    card: dict[str, Any], bootstrap: str, topic: str, records: int, notes: list[str]
) -> list[dict[str, Any]]:
    """Per-channel drift of the topic's last `records` sensor readings ({"values": {channel: number}})."""
    from pipeline.kafka.tail import follow
    from pipeline.registry import drift

    stats = card.get("channel_stats")
    if not stats:
        notes.append("input drift skipped: the champion's card holds no channel_stats (retrain with pipeline train)")
        return []
    tail: deque[bytes] = deque(maxlen=records)
    for _key, value in follow(bootstrap, topic, from_beginning=True, idle_timeout_s=2.0):
        tail.append(value)
    live: dict[str, list[float]] = {name: [] for name in stats}
    for value in tail:
        try:
            readings = json.loads(value).get("values")
        except (ValueError, AttributeError):
            continue  # not a sensor reading: the dead-letter path of the service deals with it
        if not isinstance(readings, dict):
            continue
        for name, series in live.items():
            x = readings.get(name)
            if isinstance(x, int | float) and not isinstance(x, bool):
                series.append(float(x))
    found = drift.channel_drift(live, stats)
    if not found:
        notes.append(
            f"input drift skipped: no readings of the card's channels in the last {len(tail)} records of {topic}"
        )
    return [
        {
            "figure": f"input {d.channel}",
            "n": d.n,
            "psi": d.psi,
            "mean_shift": d.mean_shift,
            "reading": drift.reading(d.psi) if d.psi is not None else "no quantiles",
        }
        for d in found
    ]


@models_app.command("compare")
def compare_cmd(
    champion: Annotated[str, typer.Argument(help="version A (its alerts: the alerts table)")],
    challenger: Annotated[str, typer.Argument(help="version B (its shadow alerts)")],
    stream: Annotated[str | None, typer.Option("--stream", help="only this stream's alerts")] = None,
    since: Annotated[str | None, typer.Option("--since", help="ISO time or age: 15m, 2h, 7d (event time)")] = None,
    run_id: Annotated[
        str | None,
        typer.Option("--run-id", help="only this run (the live PIPELINE_RUN_ID, or a replay's); default: every run"),
    ] = None,
    png: Annotated[Path | None, typer.Option("--png", help="write the score distributions to this PNG")] = None,
    as_json: JsonOpt = False,
    database_url: DbOpt = None,
) -> None:
    """Two versions' alerts and scores over the same window: alert rates, overlap of alerted entities and
    events, precision on operator-labelled events, score quantiles side by side (and a PNG with the `plot`
    extra). Without --run-id every run counts (the live run and replays), each event once per version."""
    from pipeline.alerts.cli import parse_since
    from pipeline.registry import compare as comparison

    if champion == challenger:
        raise ConfigError("compare needs two different versions")
    t0 = parse_since(since)
    with _store(database_url) as store:
        registry = ModelRegistry(store)
        for version in (champion, challenger):
            registry.show(version)
        rows = {
            v: _once_per_event(
                store.version_alerts(v, shadow=False, stream=stream, since=t0, run_id=run_id)
                + store.version_alerts(v, shadow=True, stream=stream, since=t0, run_id=run_id)
            )
            for v in (champion, challenger)
        }
        scores = {v: store.version_scores(v, stream=stream, since=t0, run_id=run_id) for v in (champion, challenger)}
        scored_to = [store.last_scored(v, stream=stream, run_id=run_id) for v in (champion, challenger)]
    refs = {v: [_alert_ref(r) for r in rs] for v, rs in rows.items()}
    result = comparison.compare(
        champion,
        refs[champion],
        scores[champion],
        challenger,
        refs[challenger],
        scores[challenger],
        _window_s(t0, rows, [t for t in scored_to if t is not None]),
    )
    if as_json:
        _print_json(_comparison_json(result))
    else:
        _print_comparison(result)
    if png is not None:
        _write_png(png, {champion: scores[champion], challenger: scores[challenger]})


def _alert_ref(row: dict[str, Any]) -> comparison.AlertRef:
    from pipeline.registry import compare as comparison

    key = f"{row['source_topic']}|{row['source_partition']}|{row['source_offset']}"
    return comparison.AlertRef(row["entity_id"], key, row["label"])


def _once_per_event(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One alert per source event: the same event alerted in the live run and in replays counts once (a
    labelled copy wins, so precision sees the operator's verdict)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        key = (r["source_topic"], r["source_partition"], r["source_offset"])
        if key not in out or (out[key]["label"] is None and r["label"] is not None):
            out[key] = r
    return sorted(out.values(), key=lambda r: _utc(r["event_time"]))


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)  # SQLite hands back naive UTC


def _window_s(since: datetime | None, rows: dict[str, list[dict[str, Any]]], scored_to: list[datetime]) -> float | None:
    """Seconds of event time the rates are over: from the first to the last alert; with --since, from it to
    the end of what the versions scored (their newest score sample, or the last alert). The alerts are
    selected by event time, so the window is too: a replay of last year's data is not divided by the time
    since then."""
    times = [_utc(r["event_time"]) for rs in rows.values() for r in rs]
    start, ends = (since, times + [_utc(t) for t in scored_to]) if since is not None else (None, times)
    if not ends:
        return None
    seconds = (max(ends) - (start or min(ends))).total_seconds()
    return seconds if seconds > 0 else None  # all scored before --since: no window (it read "-0 per hour")


def _comparison_json(c: comparison.Comparison) -> dict[str, Any]:
    def summary(s: comparison.VersionSummary) -> dict[str, Any]:
        quantiles = {str(k): v for k, v in (s.score_quantiles or {}).items()}
        return {**s.__dict__, "score_quantiles": quantiles or None}

    return {**c.__dict__, "a": summary(c.a), "b": summary(c.b)}


def _print_comparison(c: comparison.Comparison) -> None:
    from pipeline.registry import compare as comparison

    def fmt(x: float | None, spec: str = ".3g") -> str:
        return "" if x is None else format(x, spec)

    table = Table(title=f"{c.a.version} (A) vs {c.b.version} (B)")
    table.add_column("figure")
    table.add_column("A", justify="right")
    table.add_column("B", justify="right")
    table.add_row("alerts", str(c.a.alerts), str(c.b.alerts))
    table.add_row("alerts per hour", fmt(c.a.alerts_per_hour), fmt(c.b.alerts_per_hour))
    table.add_row("alerted entities", str(c.a.entities), str(c.b.entities))
    table.add_row("labelled alerts", str(c.a.labelled), str(c.b.labelled))
    table.add_row("precision (labelled)", fmt(c.a.precision, ".2f"), fmt(c.b.precision, ".2f"))
    table.add_row("score samples", str(c.a.scores), str(c.b.scores))
    for level in comparison.QUANTILE_LEVELS:
        table.add_row(
            f"score q{level:g}",
            fmt((c.a.score_quantiles or {}).get(level)),
            fmt((c.b.score_quantiles or {}).get(level)),
        )
    out.print(table)
    if c.entity_jaccard is None or c.event_jaccard is None:
        out.print("overlap: n/a (neither version raised an alert in this window)")
        return
    out.print(
        f"overlap: entities Jaccard {c.entity_jaccard:.2f}; events Jaccard {c.event_jaccard:.2f} "
        f"({c.events_both} both, {c.events_only_a} only A, {c.events_only_b} only B)"
    )


def _write_png(path: Path, scores: dict[str, list[float]]) -> None:
    if not any(scores.values()):
        err.print(f"note: no PNG written: no score samples of {' or '.join(scores)}")
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        err.print(
            escape("note: no PNG written: matplotlib is not installed (pip install 'streaming-anomaly-pipeline[plot]')")
        )
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for version, values in scores.items():
        if values:
            ax.hist(values, bins=60, histtype="step", density=True, label=f"{version} ({len(values)})")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.set_title("score distribution per version")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise ConfigError(f"--png {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    typer.echo(f"wrote {path}")
