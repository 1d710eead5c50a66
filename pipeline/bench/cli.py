"""`pipeline bench`: one run measures end-to-end throughput/latency, the scorer, peers and memory."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console(stderr=True)
out = Console()


def bench(
    events: Annotated[int, typer.Option(min=1, help="events for the end-to-end drain run")] = 200_000,
    entities: Annotated[int, typer.Option(min=1, help="distinct entities (pumps)")] = 10_000,
    rate: Annotated[
        float, typer.Option(min=0.0, help="paced latency run: events/s sent by a producer process; 0 skips it")
    ] = 20000.0,
    paced_seconds: Annotated[float, typer.Option(min=0.1, help="length of the paced latency run")] = 20.0,
    soak: Annotated[
        float | None, typer.Option(min=0.1, help="also run a paced soak for this many seconds (RSS trend)")
    ] = None,
    soak_rate: Annotated[float, typer.Option(min=1.0, help="events/s during the soak")] = 5000.0,
    database_url: Annotated[str | None, typer.Option(help="default: a fresh SQLite file in a temp dir")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="default KAFKA_BOOTSTRAP, else an embedded Tansu")] = None,
    batch: Annotated[int, typer.Option(min=1, help="processor max_batch_records")] = 1000,
    commit_interval_ms: Annotated[int, typer.Option(min=1, help="processor commit interval")] = 100,
    snapshot_interval_s: Annotated[float, typer.Option(min=0.1, help="processor state snapshot interval")] = 10.0,
    fetch_max_wait_ms: Annotated[
        int,
        typer.Option(min=0, help="consumer fetch_max_wait_ms (Tansu holds a fetch this long when no data is there)"),
    ] = 20,
    torch_threads: Annotated[int, typer.Option(min=0, help="torch intra-op threads (0 = torch default)")] = 1,
    peers: Annotated[bool, typer.Option(help="run the River and naive-loop peers")] = True,
    shadow: Annotated[
        bool,
        typer.Option(
            help="also run the e2e drain and paced runs with a challenger (a second copy of the model scoring "
            "every event in shadow); targets: >= 50% of the single-model events/s, p99 <= 250 ms at --rate"
        ),
    ] = True,
    precisions: Annotated[
        str | None,
        typer.Option(
            help="also compare scoring precisions side by side, e.g. fp32,bf16,int8 (scorer windows/s and e2e "
            "drain events/s per precision, interleaved)"
        ),
    ] = None,
    precision_repeats: Annotated[
        int, typer.Option(min=1, help="interleaved rounds of the precision table (best kept)")
    ] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")] = False,
    output: Annotated[Path | None, typer.Option(help="also write the JSON result here")] = None,
) -> None:
    """Benchmark on the local broker: e2e events/s and p50/p99 latency, scorer windows/s (CPU, CUDA when
    present), River HalfSpaceTrees and naive per-event LSTM peers, bytes per live entity, optional soak."""
    import torch

    from pipeline.bench import core
    from pipeline.cli import _settings
    from pipeline.errors import ConfigError
    from pipeline.kafka.broker import resolve_bootstrap

    wanted = [p.strip() for p in (precisions or "").split(",") if p.strip()]
    bad = [p for p in wanted if p not in ("fp32", "bf16", "int8")]
    if bad:
        raise ConfigError(f"--precisions: unknown {', '.join(bad)} (expected fp32, bf16, int8)")
    import importlib.util

    if peers and importlib.util.find_spec("river") is None:  # checked first: the peers run after the e2e part
        raise ConfigError(
            "the River peer needs the 'bench' extra: pip install 'streaming-anomaly-pipeline[bench]' "
            "(or pass --no-peers)"
        )
    s = _settings()
    s.device = "cpu"
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    info = core.machine()
    boot, broker = resolve_bootstrap(bootstrap or s.kafka_bootstrap)
    tmp = tempfile.TemporaryDirectory(prefix="pipeline-bench-")
    db_url = database_url or f"sqlite:///{tmp.name}/bench.db"
    say = console.print
    result: dict[str, Any] = {
        "machine": info,
        "broker": "embedded Tansu (memory storage)" if broker else boot,
        "database": db_url.split("://")[0],
        "events": events,
        "entities": entities,
    }
    try:
        say(
            f"[bold]bench[/bold] on {info['cpu']} x{info['cores']} (load {info['load_avg_at_start']}), "
            f"broker {boot}, database {result['database']}"
        )
        e2e = functools.partial(
            core.run_e2e,
            s,
            boot,
            db_url,
            entities=entities,
            batch=batch,
            commit_interval_ms=commit_interval_ms,
            snapshot_interval_s=snapshot_interval_s,
            fetch_max_wait_ms=fetch_max_wait_ms,
            progress=say,
        )
        drain = e2e(events=events, rate=None)
        say(f"e2e drain: {drain.events} events in {drain.seconds:.1f}s = {drain.events_per_s:,.0f} events/s")
        result["e2e_drain"] = drain.__dict__
        result["e2e_events_per_s"] = round(drain.events_per_s, 1)
        paced_rate = rate
        if paced_rate > 0:
            n = int(paced_rate * paced_seconds)
            paced = e2e(events=n, rate=paced_rate)
            say(f"e2e paced at {paced_rate:,.0f}/s: {paced.events} events, latency ms {paced.latency_ms}")
            result["e2e_paced"] = paced.__dict__
            result["p50_latency_ms"] = paced.latency_ms.get("p50")
            result["p99_latency_ms"] = paced.latency_ms.get("p99")
            result["paced_rate_events_per_s"] = paced_rate
        if shadow:
            result["shadow"] = _shadow_runs(e2e, drain, result.get("p99_latency_ms"), events, rate, paced_seconds)
        result["load_avg_after_e2e"] = [round(x, 2) for x in os.getloadavg()]
        load = core.SensorLoad(entities, seed=1)
        cpu = core.bench_scorer(s, load, device="cpu", batch=batch)
        say(f"scorer cpu: {cpu['windows_per_s']:,.0f} windows/s (batch {cpu['batch']})")
        result["scorer_cpu"] = cpu
        result["scorer_windows_per_s"] = round(cpu["windows_per_s"], 1)
        from pipeline.bench.families import bench_families  # both model families on the same events

        fam = bench_families(s, entities=entities, batch=batch)
        say(
            f"scorer families: autoencoder {fam['lstm_ae']['events_per_s']:,.0f} events/s, stateful forecaster "
            f"{fam['lstm_forecast']['events_per_s']:,.0f} events/s ({fam['forecast_vs_ae']}x)"
        )
        result["scorer_families"] = fam
        if torch.cuda.is_available():
            gpu = core.bench_scorer(s, load, device="cuda", batch=32768)  # two full 16k-window chunks
            say(
                f"scorer cuda: {gpu['windows_per_s']:,.0f} windows/s (batch {gpu['batch']}, batch fill "
                f"{gpu['batch_fill']:.0%} of {gpu['model_chunk']}, model {gpu['model_share_of_time']:.0%} of the time)"
            )
            result["scorer_cuda"] = gpu
            result["scorer_cuda_windows_per_s"] = round(gpu["windows_per_s"], 1)
        if peers:
            naive = core.bench_naive(s, load)
            river = core.bench_river(load)
            say(
                f"naive per-event LSTM: {naive['events_per_s']:,.0f} events/s; "
                f"River HST per entity: {river['events_per_s']:,.0f} events/s"
            )
            result["naive"] = naive
            result["river"] = river
            result["naive_events_per_s"] = round(naive["events_per_s"], 1)
            result["peer_river_events_per_s"] = round(river["events_per_s"], 1)
            result["scorer_vs_naive"] = round(cpu["windows_per_s"] / naive["events_per_s"], 1)
            result["e2e_vs_river"] = round(drain.events_per_s / river["events_per_s"], 2)
        if wanted:
            rows = core.bench_precisions(
                s,
                boot,
                db_url,
                wanted,
                events=events,
                entities=entities,
                batch=batch,
                repeats=precision_repeats,
                progress=say,
                commit_interval_ms=commit_interval_ms,
                snapshot_interval_s=snapshot_interval_s,
                fetch_max_wait_ms=fetch_max_wait_ms,
            )
            for r in rows:
                say(
                    f"precision {r['precision']:>4} (runs as {r['runs_as']}): {r['windows_per_s']:,.0f} windows/s "
                    f"({r['windows_vs_fp32']}x), model only {r['model_only_windows_per_s']:,.0f} "
                    f"({r['model_only_vs_fp32']}x), model best-of-interleaved {r['model_best_windows_per_s']:,.0f} "
                    f"({r['model_best_vs_fp32']}x), e2e {r['e2e_events_per_s']:,.0f} events/s ({r['e2e_vs_fp32']}x)"
                )
            result["precisions"] = rows
        mem = core.bench_memory(s, entities)
        say(
            f"memory: {mem['bytes_per_entity']:,.0f} bytes per live entity "
            f"({mem['array_bytes_per_slot']:,.0f} B of state arrays per slot)"
        )
        result["memory"] = mem
        result["bytes_per_entity"] = round(mem["bytes_per_entity"], 1)
        if soak:
            sk = core.run_e2e(
                s,
                boot,
                db_url,
                events=0,
                entities=entities,
                rate=soak_rate,
                duration_s=soak,
                batch=batch,
                commit_interval_ms=commit_interval_ms,
                snapshot_interval_s=snapshot_interval_s,
                fetch_max_wait_ms=fetch_max_wait_ms,
                progress=say,
            )
            summary = core.soak_summary(sk.extra.get("rss_samples", []))
            say(f"soak {soak:.0f}s at {soak_rate:,.0f}/s: {summary}")
            result["soak"] = {**sk.__dict__, "summary": summary}
        result["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if broker is not None:
            broker.stop()
        tmp.cleanup()
    text = json.dumps(result, default=str, indent=2)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    if as_json:
        print(text)
    else:
        keys = (
            "e2e_events_per_s",
            "p50_latency_ms",
            "p99_latency_ms",
            "shadow",
            "scorer_windows_per_s",
            "naive_events_per_s",
            "peer_river_events_per_s",
            "bytes_per_entity",
        )
        for k in keys:
            out.print(f"{k}: {result.get(k)}")


def _shadow_runs(
    e2e: Any, single: Any, single_p99: float | None, events: int, rate: float, paced_seconds: float
) -> dict[str, Any]:
    """The drain and paced runs again with a challenger scoring every event in shadow, against the single model."""
    drain = e2e(events=events, rate=None, shadow=True)
    ratio = drain.events_per_s / max(single.events_per_s, 1e-9)
    console.print(
        f"e2e drain with a challenger: {drain.events_per_s:,.0f} events/s = {ratio:.0%} of the single model's "
        f"(target >= 50%); the challenger scored {drain.extra.get('shadow_scored')} events"
    )
    out: dict[str, Any] = {
        "e2e_events_per_s": round(drain.events_per_s, 1),
        "vs_single_model": round(ratio, 3),
        "single_model_p99_latency_ms": single_p99,
        "drain": drain.__dict__,
    }
    if rate > 0:
        paced = e2e(events=int(rate * paced_seconds), rate=rate, shadow=True)
        p99 = paced.latency_ms.get("p99")
        console.print(
            f"e2e paced at {rate:,.0f}/s with a challenger: latency ms {paced.latency_ms} (target p99 <= 250)"
        )
        out.update(p99_latency_ms=p99, paced=paced.__dict__)
    return out


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
