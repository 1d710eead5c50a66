"""Train a declared stream's model on its own history: the checked rows (pipeline.train.data) go through
the serving path's scaling (pipeline.training), the model is written with its card, and optionally
registered as a new version.

Family: the stateful forecaster by default, with the parameters `pipeline evaluate` uses for sensors
(SkabConfig: chosen by rank over the validation sources, docs/results/evaluation.md); it trains with
truncated BPTT and gradient clipping. `lstm_ae` (the bundled sensors model's family) is the alternative.
All declared channels are model inputs in declaration order; only `scored` channels make the score
(context channels are read, as the SKAB protocol reads slow thermal channels).

Held-out data: the last `holdout` share of each entity's rows (by time) fits the error model and the
threshold, scored with the state of the rows before it, as serving would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from models.lstm_ae import Checkpoint, LSTMAEConfig, TrainConfig, save_checkpoint
from models.lstm_forecast import ForecastCheckpoint, ForecastConfig, ForecastTrainConfig, save_forecaster
from pipeline.errors import ConfigError
from pipeline.evaluate.skab import SkabConfig
from pipeline.features.streams import EventColumns
from pipeline.streams.config import Stream
from pipeline.streams.decode import stream_spec
from pipeline.train.data import Rows, TrainingTable, iso_time, training_rows
from pipeline.training import train_stream_forecaster, train_stream_model

FAMILIES = ("lstm_forecast", "lstm_ae")
SENSORS = SkabConfig()  # the evaluated sensor defaults: family, its parameters, epochs
CHANNEL_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)  # per channel in the card: the drift baseline
GRADIENT_CLIP = 1.0


@dataclass(frozen=True)
class TrainOptions:
    family: str = SENSORS.family
    epochs: int = SENSORS.epochs
    seed: int = 0
    holdout: float = 0.2  # the last share of each entity's rows: threshold calibration
    min_history: int = 8  # an entity's events before its windows train the model (the service's default)
    device: str = "cpu"


@dataclass(frozen=True)
class Trained:
    path: Path
    card: dict[str, Any]


def check_trainable(stream: Stream) -> None:
    """Training on a user's own history is for sensors streams (checked before any history is read)."""
    if stream.kind != "sensors":
        raise ConfigError(
            f"stream {stream.name!r} is {stream.kind}: training on your own history is for sensors streams; "
            "a transactions model comes from `pipeline evaluate --format transactions --save-model`"
        )


def train_on_history(
    stream: Stream,
    table: TrainingTable,
    out_dir: Path,
    options: TrainOptions = TrainOptions(),
    *,
    labelled: set[tuple[str, float]] | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> Trained:
    """labelled: (entity, event epoch seconds) of alerts operators confirmed (None: no database to ask)."""
    check_trainable(stream)
    if options.family not in FAMILIES:
        raise ConfigError(f"--family {options.family!r}: expected one of {', '.join(FAMILIES)}")
    if not 0.0 < options.holdout < 1.0:
        raise ConfigError(f"--holdout {options.holdout}: expected a share between 0 and 1")
    forecaster = options.family == "lstm_forecast"
    fc, ftc = forecast_configs(stream, options)
    ae, aet = autoencoder_configs(stream, options)
    warmup = max(options.min_history, ftc.burn_in if forecaster else ae.window)
    rows = training_rows(table, stream, labelled=labelled or set(), holdout=options.holdout, warmup=warmup)
    t = rows.table
    spec = stream_spec(stream)
    cols = EventColumns(t.entity_ids.tolist(), t.ts, t.values)
    card = data_card(stream, rows, labels_checked=labelled is not None)
    if forecaster:  # the threshold knobs chosen with these parameters on validation; the service serves them
        card["threshold_knobs"] = asdict(SENSORS.threshold)
    ckpt: Checkpoint | ForecastCheckpoint
    if forecaster:
        ckpt = train_stream_forecaster(
            spec,
            cols,
            model=fc,
            train=ftc,
            min_history=options.min_history,
            name=f"{stream.name}-lstm-forecast",
            device=options.device,
            progress=progress,
            extra_card=card,
        )
        windows = int((~rows.held_out).sum())  # one prediction step per training row
    else:
        ckpt = train_stream_model(
            spec,
            cols,
            model=ae,
            train=aet,
            min_history=options.min_history,
            name=f"{stream.name}-lstm-ae",
            device=options.device,
            progress=progress,
            extra_card=card,
            held_out_rows=rows.held_out,
        )
        windows = int(ckpt.card["n_windows"])
    seconds = float(ckpt.card["metrics"]["train_seconds"])
    ckpt.card["training_windows"] = windows * options.epochs
    ckpt.card["seconds_per_100k_windows"] = round(seconds / max(windows * options.epochs, 1) * 1e5, 3)
    ckpt.card["content_sha256"] = content_hash(ckpt)
    target = out_dir / f"{stream.name}.pt"
    path = save_forecaster(ckpt, target) if isinstance(ckpt, ForecastCheckpoint) else save_checkpoint(ckpt, target)
    return Trained(path, ckpt.card)


def forecast_configs(stream: Stream, options: TrainOptions) -> tuple[ForecastConfig, ForecastTrainConfig]:
    """SKAB's forecaster parameters (a mix of both configs' fields), scoring the stream's scored channels."""
    model_keys = {f.name for f in fields(ForecastConfig)}
    params = dict(SENSORS.forecast)
    model = ForecastConfig(
        n_features=len(stream.channels),
        score_features=scored_features(stream),
        **{k: v for k, v in params.items() if k in model_keys},
    )
    train = ForecastTrainConfig(
        epochs=options.epochs,
        seed=options.seed,
        val_fraction=options.holdout,
        **{k: v for k, v in params.items() if k not in model_keys},
    )
    return model, train


def autoencoder_configs(stream: Stream, options: TrainOptions) -> tuple[LSTMAEConfig, TrainConfig]:
    model = LSTMAEConfig(n_features=len(stream.channels), score_features=scored_features(stream), **SENSORS.model)
    return model, TrainConfig(epochs=options.epochs, seed=options.seed, clip=GRADIENT_CLIP)


def scored_features(stream: Stream) -> tuple[int, ...] | None:
    """Indexes of the scored channels; None: all of them."""
    scored = tuple(i for i, c in enumerate(stream.channels) if c.role == "scored")
    return None if len(scored) == len(stream.channels) else scored


def data_card(stream: Stream, rows: Rows, *, labels_checked: bool) -> dict[str, Any]:
    """What the model was trained on: stream, channels, data range, row counts, per-channel statistics."""
    t = rows.table
    held = int(rows.held_out.sum())
    return {
        "stream": stream.name,
        "stream_kind": stream.kind,
        "entity_key": stream.entity_key,
        "time_field": stream.time_field,
        "channels": [c.model_dump(exclude_none=True) for c in stream.channels],
        "data": {
            "sources": sorted({o.name for o in t.origins}),
            "first_time": iso_time(float(t.ts.min())),
            "last_time": iso_time(float(t.ts.max())),
            "entities": len(rows.entities),
            "rows": {
                "read": rows.rows_read + sum(t.skipped_invalid.values()),
                "train": len(t) - held,
                "held_out": held,
                "skipped_labelled": rows.skipped_labelled if labels_checked else None,
                "skipped_invalid": dict(sorted(t.skipped_invalid.items())),
            },
        },
        "channel_stats": {c.name: channel_stats(t.values[:, j], c.min, c.max) for j, c in enumerate(stream.channels)},
    }


def channel_stats(values: np.ndarray, low: float | None, high: float | None) -> dict[str, Any]:
    """Raw-unit statistics of one channel over the training rows; rows outside the declared range hints."""
    stats: dict[str, Any] = {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "quantiles": {str(q): float(np.quantile(values, q)) for q in CHANNEL_QUANTILES},
    }
    if low is not None or high is not None:
        outside = (values < (-np.inf if low is None else low)) | (values > (np.inf if high is None else high))
        stats["outside_range_hint"] = int(outside.sum())
    return stats


def content_hash(ckpt: Checkpoint | ForecastCheckpoint) -> str:
    """sha256 of the weights, the error model and the card (the threshold is in the card)."""
    h = hashlib.sha256()
    for name, tensor in sorted(ckpt.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(ckpt.error_model.mean).tobytes())
    h.update(np.ascontiguousarray(ckpt.error_model.precision).tobytes())
    card = {k: v for k, v in ckpt.card.items() if k != "content_sha256"}
    h.update(json.dumps(card, sort_keys=True, default=str).encode())
    return h.hexdigest()


# -- the database: operator labels in, new versions out ------------------------------------------------------
def labelled_anomalies(database_url: str, stream: str, *, create: bool = False) -> set[tuple[str, float]]:
    """(entity, event epoch seconds) of the stream's alerts that operators labelled true positive.
    create: `train --register` may come before the service ever ran (a new SQLite file holds no labels);
    without it a SQLite file that is not there is refused (a mistyped path would read as "no labels")."""
    from pipeline.alerts.feedback import confirmed_keys
    from pipeline.sinks import AlertQueries, Database

    db = Database(database_url, existing=not create)
    try:
        db.create_schema()
        return confirmed_keys(AlertQueries(db), stream=stream)
    finally:
        db.dispose()


def register_version(path: Path, stream: str, database_url: str) -> str:
    """The new checkpoint as a version of `stream` in the model registry (the same file again: that version)."""
    from pipeline.registry import ModelRegistry
    from pipeline.sinks.registry import SqlRegistryStore

    store = SqlRegistryStore.connect(database_url)
    try:
        return ModelRegistry(store).register(path, stream)
    finally:
        store.dispose()
