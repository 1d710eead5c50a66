"""`pipeline replay`: score a historical range into its own run id, or diff the alerts of two runs."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from pipeline.replay.core import ReplayResult

console = Console(stderr=True)
out = Console()


def replay(
    topic: Annotated[list[str] | None, typer.Option("--topic", help="topic to replay (repeatable)")] = None,
    from_time: Annotated[
        str | None, typer.Option("--from", help="ISO time (UTC if naive) or epoch ms; inclusive")
    ] = None,
    to_time: Annotated[str | None, typer.Option("--to", help="ISO time or epoch ms; exclusive")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="model: a .pt path or a card version/name; with PIPELINE_STREAMS_FILE as a stream file names one "
            "(registry version or NAME@ALIAS, .pt, bundled:KIND)"
        ),
    ] = None,
    stream: Annotated[
        str | None,
        typer.Option(
            help="with PIPELINE_STREAMS_FILE: the declared stream a topic carries (default: the one declaring the "
            "topic); else transactions | sensors (default: from topic or model)"
        ),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option(help="namespace of the replay's alerts/state (default generated)")
    ] = None,
    seek: Annotated[str, typer.Option(help="auto: verified offsets_for_times hint; scan: from the beginning")] = "auto",
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap; default KAFKA_BOOTSTRAP")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL; default DATABASE_URL")] = None,
    diff: Annotated[tuple[str, str] | None, typer.Option(help="RUN_A RUN_B: alerts added/removed from A to B")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Replay a historical range of TOPIC into an isolated run id (or --diff RUN_A RUN_B)."""
    from pipeline.cli import _settings, _stop_on_signals
    from pipeline.errors import ConfigError
    from pipeline.replay.core import default_run_id, diff_runs, parse_range, run_replay, shared_topics
    from pipeline.sinks import AlertQueries, Database, SqlCheckpointStore

    s = _settings(database_url=database_url)
    if diff is not None:
        db = Database(s.database_url, existing=True)
        try:
            queries = AlertQueries(db)
            unknown = [r for r in dict.fromkeys(diff) if not queries.known_run(r)]
            if unknown:
                where = db.engine.url.render_as_string(hide_password=True)
                raise ConfigError(
                    f"--diff: no run {', '.join(map(repr, unknown))} in {where}: it wrote no "
                    "checkpoint and no alert (a replay that read no event writes nothing; `pipeline replay` prints "
                    "the run id it writes; the live run's is PIPELINE_RUN_ID)"
                )
            topics, one_sided = shared_topics(SqlCheckpointStore(db), diff[0], diff[1])
            result = diff_runs(queries, diff[0], diff[1], topics=topics)
            result["topics_read_by_one_run"] = sorted(one_sided)
        finally:
            db.dispose()
        _print_diff(result, as_json)
        return
    if not topic:
        raise ConfigError("pass --topic (or --diff RUN_A RUN_B)")
    if seek not in ("auto", "scan"):
        raise ConfigError("--seek must be auto or scan")
    boot = bootstrap or s.kafka_bootstrap
    if not boot:
        raise ConfigError("a replay reads an existing broker: set --bootstrap or KAFKA_BOOTSTRAP")
    rid = run_id or default_run_id()
    if rid == s.run_id:
        raise ConfigError(f"run id {rid!r} is the live run's namespace; pick another")
    from_ms, to_ms = parse_range(from_time, to_time)
    # SIGINT/SIGTERM (Ctrl-C, a supervisor, a background job whose SIGINT is ignored) stop after the current
    # batch with a checkpoint: the same --run-id goes on from there
    stop = _stop_on_signals("stopping the replay after this batch, checkpointing what it scored")
    console.print(f"replay run id: [bold]{rid}[/bold]")
    from tqdm import tqdm

    bar = tqdm(total=0, unit="ev", unit_scale=True, desc=f"replay {rid}", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        res = run_replay(
            s,
            boot,
            topic,
            from_ms=from_ms,
            to_ms=to_ms,
            model=model,
            stream=stream,
            run_id=rid,
            seek_mode=seek,  # type: ignore[arg-type]
            progress=progress,
            stop=stop,
        )
    finally:
        bar.close()
    if as_json:
        out.print_json(json.dumps(res.to_dict()))
    else:
        _print_summary(res)
    if stop.is_set():
        console.print(f"[yellow]interrupted:[/yellow] `--run-id {rid}` again goes on from where this replay stopped")
        raise typer.Exit(130)
    if res.all_dead_lettered:
        console.print(
            f"[red]every record read was dead-lettered ({res.dead_letters}), none scored:[/red] the topic does not "
            "carry what the stream's model reads (check --stream, --model and the topic)"
        )
        raise typer.Exit(1)


def _print_summary(res: ReplayResult) -> None:
    if res.resumed:
        out.print(
            f"run {res.run_id} existed: went on from its durable positions, so events it had already scored "
            "are not counted again below (a new --run-id scores the whole range)"
        )
    read = "events read past its durable positions" if res.resumed else "events in range"
    rebuilt = f" (and {res.rebuilt} again, to rebuild state from its snapshot)" if res.rebuilt else ""
    out.print(
        f"run {res.run_id}: {res.events - res.rebuilt} {read} ({res.out_of_range} outside the time range), "
        f"{res.scored} scored{rebuilt}, {res.alerts} alerts, dead letters {res.dead_letters or 0}, "
        f"{res.duplicates} duplicates dropped, "
        f"{res.seconds:.1f}s ({res.events_per_s:,.0f} events/s); models {res.model_versions}"
    )
    if res.events == 0 and not res.resumed:
        out.print(f"nothing was read, so run {res.run_id} holds nothing (there is nothing to --diff against it)")


def _print_diff(d: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(d, default=str))
        return
    if d.get("topics_read_by_one_run"):
        out.print(
            f"compared on the topics both runs read ({', '.join(d['topics'])}); left out, read by one run only: "
            f"{', '.join(d['topics_read_by_one_run'])}"
        )
    out.print(
        f"{d['run_a']} -> {d['run_b']}: {d['alerts_a']} -> {d['alerts_b']} alerts; "
        f"[green]+{d['added']} added[/green] ({d['entities_added']} entities), "
        f"[red]-{d['removed']} removed[/red] ({d['entities_removed']} entities), {d['common']} in both "
        f"(mean |score change| {d['mean_abs_score_change_common']:.4g}); "
        f"models {d['models_a']} -> {d['models_b']}"
    )
    table = Table(title="by stream")
    for col in ("stream", "added", "removed", "common"):
        table.add_column(col)
    for name, c in sorted(d["by_stream"].items()):
        table.add_row(name, str(c["added"]), str(c["removed"]), str(c["common"]))
    out.print(table)
    for title, rows in (("added (first 20)", d["added_examples"]), ("removed (first 20)", d["removed_examples"])):
        if not rows:
            continue
        t = Table(title=title)
        for col in ("stream", "entity_id", "event_time", "score", "threshold", "source"):
            t.add_column(col)
        for r in rows:
            t.add_row(*(str(r[c]) for c in ("stream", "entity_id", "event_time", "score", "threshold", "source")))
        out.print(t)


def register(app: typer.Typer) -> None:
    app.command("replay")(replay)
