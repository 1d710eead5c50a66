"""`pipeline` command line: run, demo, train, produce, broker (and evaluate, replay, bench, alerts)."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.config import Settings, settings_error, unknown_variables
from pipeline.errors import ConfigError, PipelineError
from pipeline.logs import configure

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Streaming anomaly detection: Kafka in, per-entity LSTM scoring (autoencoder or stateful forecaster), "
    "alerts out.",
)
console = Console(stderr=True)
out = Console()
log = logging.getLogger("pipeline.cli")


DEMO_DATABASE = "sqlite:///var/demo.db"


def _settings(**overrides: Any) -> Settings:
    s = Settings()
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    configure(s.log_level, s.log_json)
    from dotenv import dotenv_values  # pydantic-settings reads `.env` with it: a typo there is as silent

    env_file = Path(str(Settings.model_config["env_file"]))
    names = {**(dotenv_values(env_file) if env_file.is_file() else {}), **os.environ}
    for name in unknown_variables(names):
        log.warning("%s is not a setting; it is ignored", name)
    return s


def _stop_on_signals(doing: str = "finishing the current batch, checkpointing, exiting") -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: %s", signum, doing)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@app.command()
def run(
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap; default KAFKA_BOOTSTRAP or embedded")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL; default DATABASE_URL")] = None,
    idle_exit: Annotated[
        float | None, typer.Option(min=0.0, help="exit after this many idle seconds with no lag")
    ] = None,
    max_events: Annotated[
        int | None, typer.Option(min=1, help="exit once this many events were processed (at a batch's end)")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="serve Prometheus /metrics on this port")
    ] = None,
    group_id: Annotated[str | None, typer.Option()] = None,
    api_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="also serve the alerts API and page on this port")
    ] = None,
    host: Annotated[
        str, typer.Option("--host", "--api-host", help="listen address of --metrics-port and --api-port (0.0.0.0: all)")
    ] = "127.0.0.1",
) -> None:
    """Run the stream processor until SIGTERM/SIGINT (or --idle-exit / --max-events)."""
    from pipeline.app import build_service
    from pipeline.kafka.broker import resolve_bootstrap

    s = _settings(database_url=database_url, group_id=group_id)
    with ExitStack() as cleanup:  # unwinds in reverse: API, service, then the embedded broker, also on errors
        boot, broker = resolve_bootstrap(bootstrap or s.kafka_bootstrap)
        if broker is not None:
            cleanup.callback(broker.stop)
            console.print(f"[yellow]no KAFKA_BOOTSTRAP: started embedded Tansu broker at {boot}[/yellow]")
        if metrics_port:
            from prometheus_client import start_http_server

            try:
                start_http_server(metrics_port, addr=host)
            except OSError as exc:  # port taken, address not on this host: one line, as --api-port's
                raise ConfigError(f"--metrics-port {metrics_port} on {host}: {exc.strerror or exc}") from None
        stop = _stop_on_signals()
        service = build_service(s, boot)
        cleanup.callback(service.close)
        if metrics_port:
            from pipeline import metrics

            metrics.read_lifecycle_at_scrape(lambda: service.queries.lifecycle_stats(s.run_id))
        if api_port:
            from pipeline.api.app import create_app
            from pipeline.api.server import ApiServer

            # in-process, so /metrics shows the processor's live counters
            api = ApiServer(
                create_app(
                    service.queries,
                    s,
                    run_id=s.run_id,
                    not_ready=service.not_ready,
                    drift=service.processor.drift.figures,
                ),
                host=host,
                port=api_port,
            ).start()
            cleanup.callback(api.stop)
            log.info("alerts API and page on %s", api.url)
        stats = service.processor.run(stop, idle_exit_s=idle_exit, max_events=max_events)
        log.info(
            "processor stopped: %d events, %d scored%s, %d alerts, %d dead letters, %d duplicates dropped",
            stats.events,
            stats.scored,
            f" (and {stats.rebuilt} again, to rebuild state from a snapshot)" if stats.rebuilt else "",
            stats.alerts,
            stats.dead_letters,
            stats.duplicates,
        )
        if not stats.final_checkpoint:  # a supervisor tells this apart from a clean stop
            raise typer.Exit(3)


@app.command()
def train(
    stream: Annotated[
        str | None,
        typer.Option(
            help="train this sensors stream of the stream file on its own history (--data or --topic); payments "
            "models come from `pipeline evaluate --format transactions --save-model`"
        ),
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(help="CSV/Parquet file or folder: entity, time and channel columns (repeatable)"),
    ] = None,
    topic: Annotated[str | None, typer.Option(help="read the history from this topic instead")] = None,
    from_time: Annotated[
        str | None, typer.Option("--from", help="--topic range start by Kafka record timestamp (ISO or epoch ms)")
    ] = None,
    to_time: Annotated[str | None, typer.Option("--to", help="--topic range end, exclusive")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="broker of --topic; default KAFKA_BOOTSTRAP")] = None,
    streams_file: Annotated[
        Path | None, typer.Option(help="stream file; default PIPELINE_STREAMS_FILE or the bundled one")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="where to write <stream>.pt and its card (default models/checkpoints; --stream: var/models)"
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="training epochs (default 8; --stream: 30)")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
    family: Annotated[str | None, typer.Option(help="--stream: lstm_forecast (default) or lstm_ae")] = None,
    holdout: Annotated[float, typer.Option(help="--stream: last share of each entity's rows held out")] = 0.2,
    database_url: Annotated[
        str | None,
        typer.Option(help="--stream: skip its labelled anomalies, register there; default DATABASE_URL if set"),
    ] = None,
    register: Annotated[
        bool, typer.Option("--register/--no-register", help="--stream: add the model to the registry as a new version")
    ] = False,
) -> None:
    """Train the default transaction and sensor models on simulated normal traffic, or, with --stream, a
    stream's model on its own history."""
    _settings()
    if stream is not None:
        from pipeline.train.cli import train_stream_command
        from pipeline.train.history import TrainOptions

        defaults = TrainOptions()
        train_stream_command(
            stream,
            data=data or [],
            topic=topic,
            from_time=from_time,
            to_time=to_time,
            bootstrap=bootstrap,
            streams_file=streams_file,
            out_dir=out_dir,
            options=TrainOptions(
                family=defaults.family if family is None else family,
                epochs=epochs or defaults.epochs,
                seed=seed,
                holdout=holdout,
            ),
            database_url=database_url,
            register=register,
        )
        return
    if data or topic or from_time or to_time or family or register or streams_file:
        raise ConfigError("--data, --topic, --from, --to, --family, --register and --streams-file need --stream NAME")
    from tqdm import tqdm

    from pipeline.train.cli import output_dir
    from pipeline.training import train_default_models

    target = output_dir(out_dir or Path("models/checkpoints"))
    n_epochs = epochs or 8
    bars: dict[str, tqdm] = {}

    def progress(name: str, epoch: int, tl: float, vl: float) -> None:
        bar = bars.setdefault(name, tqdm(total=n_epochs, desc=f"train {name}", file=sys.stderr))
        bar.set_postfix(train=f"{tl:.4f}", val=f"{vl:.4f}")
        bar.update(1)

    paths = train_default_models(target, Settings().sensor_channels, seed=seed, epochs=n_epochs, progress=progress)
    for b in bars.values():
        b.close()
    for name, p in paths.items():
        out.print(f"{name}: {p} (card {p.with_suffix('.card.json')})")


@app.command()
def produce(
    stream: Annotated[str, typer.Argument(help="transactions | sensors")],
    bootstrap: Annotated[str | None, typer.Option()] = None,
    entities: Annotated[int, typer.Option(min=1)] = 100,
    events_per_entity: Annotated[int, typer.Option(min=1)] = 50,
    anomalous: Annotated[int, typer.Option(min=0, help="entities with injected anomalies")] = 1,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
) -> None:
    """Produce simulated events of a bundled stream (its layout, the 8 SKAB channels for sensors, with
    injected anomalies) to PIPELINE_TRANSACTIONS_TOPIC or PIPELINE_SENSORS_TOPIC. A stream file's own
    streams are not simulated."""
    from pipeline.kafka.client import ensure_topics, make_producer, produce_json
    from pipeline.simulate import simulate_sensors, simulate_transactions, strip_labels

    if anomalous > entities:  # it was capped at --entities without a word
        raise typer.BadParameter(f"{anomalous} is more than --entities {entities}", param_hint="--anomalous")
    s = _settings()
    boot = bootstrap or s.kafka_bootstrap
    if not boot:
        raise typer.BadParameter("set --bootstrap or KAFKA_BOOTSTRAP")
    if s.streams_file is not None:
        typer.echo(
            f"note: produce writes the bundled {stream} layout; the streams of {s.streams_file} are not simulated",
            err=True,
        )
    if stream == "transactions":
        recs, inj = simulate_transactions(entities, events_per_entity, seed=seed, burst_customers=anomalous)
        topic, key = s.transactions_topic, "customer_id"
    elif stream == "sensors":
        recs, inj = simulate_sensors(entities, events_per_entity, seed=seed, spike_devices=anomalous)
        topic, key = s.sensors_topic, "device_id"
    else:
        raise typer.BadParameter("stream must be transactions or sensors")
    ensure_topics(boot, [topic], s.topic_partitions)
    producer = make_producer(boot)
    n = produce_json(producer, topic, ((r[key], r) for r in strip_labels(recs)))
    producer.close()
    out.print(f"produced {n} {stream} events to {topic}; anomalies injected on {sorted(inj.entities)}")


@app.command()
def broker(port: Annotated[int, typer.Option(min=1, max=65535)] = 9092) -> None:
    """Run the embedded Tansu broker in the foreground (memory storage) until Ctrl-C."""
    from pipeline.kafka.broker import TansuBroker

    _settings()
    stop = _stop_on_signals("stopping the broker")
    with TansuBroker(port=port) as b:
        out.print(f"Tansu broker listening on {b.bootstrap}; Ctrl-C to stop")
        while not stop.wait(1.0):
            code = b.exit_code()
            if code is not None:  # it kept running with the port closed, without a word
                log.error("the Tansu broker process exited (code %d); stopping", code)
                raise typer.Exit(1)


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=1)] = 300,
    devices: Annotated[int, typer.Option(min=1)] = 20,
    database_url: Annotated[
        str, typer.Option(help="default: var/demo.db, emptied first; another SQLite file must not exist yet")
    ] = DEMO_DATABASE,
) -> None:
    """End to end on the embedded broker and SQLite: simulate, stream, score, alert, summarize."""
    from pipeline.demo import run_demo

    s = _settings(database_url=database_url)
    own = database_url == DEMO_DATABASE  # the only database the demo may empty: its own
    summary = run_demo(s, customers=customers, devices=devices, console=console, empty_database=own)
    table = Table(title="alerts by stream")
    for col in ("stream", "scored", "alerts", "alerted entities", "injected", "caught"):
        table.add_column(col, no_wrap=True)
    for row in summary["streams"]:
        table.add_row(*(str(row[k]) for k in ("stream", "scored", "alerts", "alerted_entities", "injected", "caught")))
    out.print(table)
    top = Table(title="top alerts (score / threshold)")
    for col in ("entity", "event time", "score/thr", "severity", "top feature (obs vs recon)"):
        top.add_column(col, no_wrap=True)
    for a in summary["top_alerts"]:
        f = a["top_features"][0]
        top.add_row(
            a["entity_id"],
            str(a["event_time"])[:16],
            f"{a['score']:.0f}/{a['threshold']:.0f}",
            a["severity"],
            f"{f['feature'][:16]} {f['observed']:.3g} vs {f['reconstructed']:.3g}",
        )
    out.print(top)
    out.print(
        f"dead letters: {summary['dead_letters']} ({', '.join(summary['dlq_reasons'])}); "
        f"database: {database_url}, run {s.run_id}; {summary['seconds']:.1f}s"
    )


# Command groups living in their own packages; each module exposes register(app).
COMMAND_MODULES: list[str] = [
    "pipeline.alerts.cli",
    "pipeline.api.cli",
    "pipeline.replay.cli",
    "pipeline.bench.cli",
    "pipeline.evaluate.cli",
    "pipeline.registry.cli",
    "pipeline.streams.cli",
]


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


# optional dependencies (pyproject extras) by the module a command fails to import
EXTRA_OF_MODULE = {
    "fastapi": "api",
    "uvicorn": "api",
    "starlette": "api",
    "pandas": "evaluate",
    "pyarrow": "train",
    "sklearn": "evaluate",
    "river": "bench",
    "faust": "faust",
    "tep_studio": "validation",
}


def missing_extra(exc: ModuleNotFoundError, command: str = "") -> str | None:
    """The one-line error for a command whose optional dependency is not installed (None: not an extra's).
    `train` reads its history with pandas and pyarrow: its own extra has both (the 'evaluate' one lacks pyarrow)."""
    module = (exc.name or "").split(".")[0]
    extra = "train" if command == "train" and module in ("pandas", "pyarrow") else EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return (
        f"this command needs the '{extra}' extra ({exc.name} is not installed): "
        f"pip install 'streaming-anomaly-pipeline[{extra}]'"
    )


def main() -> None:
    _register_commands()
    try:
        app()
    except PipelineError as exc:
        console.print("[red]error:[/red]", escape(str(exc)), soft_wrap=True)  # one line, whatever the width
        raise SystemExit(2) from None
    except ValidationError as exc:  # a PIPELINE_* setting out of range or of the wrong type
        console.print("[red]error:[/red]", escape(settings_error(exc)), soft_wrap=True)
        raise SystemExit(2) from None
    except SettingsError as exc:  # a PIPELINE_* setting pydantic-settings could not even parse (bad JSON)
        field = re.search(r'field "(\w+)"', str(exc))  # "error parsing value for field "x" from source ..."
        name = f"PIPELINE_{field.group(1).upper()}" if field else str(exc).splitlines()[0]
        unparsed = f'{name}: cannot be parsed; list settings are JSON, e.g. PIPELINE_SENSOR_CHANNELS=\'["a", "b"]\''
        console.print("[red]error:[/red]", escape(unparsed), soft_wrap=True)
        raise SystemExit(2) from None
    except ModuleNotFoundError as exc:
        why = missing_extra(exc, sys.argv[1] if len(sys.argv) > 1 else "")
        if why is None:
            raise
        console.print("[red]error:[/red]", escape(why), soft_wrap=True)  # escaped: "[api]" is not markup
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
