"""`pipeline evaluate`: benchmark metrics of the production streaming scorer on labeled data."""

from __future__ import annotations

import json
import math
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.errors import ConfigError

KEYS = {
    "skab": ("f1", "far", "mar"),
    "nasa": ("f1", "precision", "recall"),
    "transactions": ("roc_auc", "average_precision", "card_precision_at_100"),
}


class Format(str, Enum):
    skab = "skab"
    nasa = "nasa"
    transactions = "transactions"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


def run_evaluation(
    fmt: str,
    data: Path,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    device: str = "cpu",
    save_model: Path | None = None,
    partitions: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Dispatch to the format's protocol; overrides apply on top of the validated defaults.
    save_model (transactions): also write the trained checkpoint, servable as PIPELINE_MODELS_DIR/transactions.pt."""
    from dataclasses import replace

    import torch

    from pipeline.scoring.scorer import select_device

    device = str(select_device(device))  # cuda without a CUDA device: one line, before any training
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    overrides: dict[str, Any] = {k: v for k, v in (("epochs", epochs), ("seed", seed)) if v is not None}
    started = time.monotonic()
    if save_model is not None and fmt != "transactions":
        raise ConfigError(
            "--save-model: only --format transactions trains one servable model (SKAB and NASA "
            "models are fitted per benchmark split)"
        )
    if partitions is not None:
        if fmt != "transactions":
            raise ConfigError("--partitions: only --format transactions has per-partition (terminal) state")
        if partitions < 1:
            raise ConfigError(f"--partitions must be >= 1, got {partitions}")
    if fmt == "skab":
        from pipeline.evaluate import skab

        res = skab.evaluate(data, replace(skab.SkabConfig(), **overrides), device=device, precision=precision)
    elif fmt == "nasa":
        from pipeline.evaluate import nasa

        res = nasa.evaluate(data, replace(nasa.NasaConfig(), **overrides), device=device, precision=precision)
    elif fmt == "transactions":
        from pipeline.evaluate import transactions

        if partitions is not None:
            overrides["partitions"] = partitions
        res = transactions.evaluate(
            data,
            replace(transactions.TransactionsConfig(), **overrides),
            device=device,
            save_model=save_model,
            precision=precision,
        )
    else:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(KEYS)}")
    res["format"] = fmt
    res["scoring_precision"] = precision  # ("precision" is a NASA metric)
    res["data"] = str(data)
    res["seconds"] = round(time.monotonic() - started, 1)
    return res


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        fmt: Annotated[Format, typer.Option("--format", help="benchmark layout and protocol")],
        data: Annotated[Path, typer.Option("--data", help="benchmark folder (or transactions CSV)")],
        as_json: Annotated[bool, typer.Option("--json", help="one JSON object on the last line of stdout")] = False,
        epochs: Annotated[int | None, typer.Option(min=1, help="override the validated number of epochs")] = None,
        seed: Annotated[int | None, typer.Option(min=0, max=2**32 - 1)] = None,
        device: Annotated[Device, typer.Option(help="where the models train and score")] = Device.cpu,
        save_model: Annotated[
            Path | None,
            typer.Option(
                "--save-model", help="transactions: also save the trained model (.pt + .card.json) for `pipeline run`"
            ),
        ] = None,
        partitions: Annotated[
            int | None,
            typer.Option(
                help="transactions: partition count of the topic the model will serve (terminal context is per "
                "partition); default 1"
            ),
        ] = None,
        precision: Annotated[
            str | None,
            typer.Option(help="scoring precision fp32 | bf16 | int8 (training stays fp32); default PIPELINE_PRECISION"),
        ] = None,
    ) -> None:
        """Train on a benchmark's training part, stream its test part through the scorer, print metrics."""
        if precision is None:
            from pipeline.cli import _settings

            precision = _settings().precision
        if precision not in ("fp32", "bf16", "int8"):
            raise ConfigError(f"--precision {precision!r}: expected fp32, bf16 or int8")
        res = run_evaluation(
            fmt.value,
            data,
            epochs=epochs,
            seed=seed,
            device=device.value,
            save_model=save_model,
            partitions=partitions,
            precision=precision,
        )
        if as_json:  # strict JSON: a metric that is undefined (ROC AUC of a test part without frauds) is null
            typer.echo(json.dumps(_finite(res), sort_keys=True, allow_nan=False))
            return
        table = Table(title=f"pipeline evaluate --format {fmt.value}")
        table.add_column("metric")
        table.add_column("value")
        for k, v in res.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        Console().print(table)


def _finite(value: Any) -> Any:
    """NaN and infinities as None (JSON null), at any depth: `NaN` is not JSON (a probe's `JSON.parse` refused it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
