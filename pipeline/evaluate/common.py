"""What every benchmark shares: train through the serving path, then stream events through StreamScorer.

Nothing here scores in bulk: events go through `StreamScorer.process` in time-ordered micro-batches with
the same per-entity state, scaling and adaptive thresholds as the Kafka processor.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from models.lstm_ae import Checkpoint, LSTMAEConfig, TrainConfig
from models.lstm_forecast import ForecastCheckpoint, ForecastConfig, ForecastTrainConfig, TooLittleData
from pipeline.errors import ConfigError
from pipeline.features.streams import EventColumns, StreamSpec
from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.scoring.scorer import StreamScorer
from pipeline.scoring.threshold import AdaptiveThreshold, DynamicThreshold, Threshold
from pipeline.training import train_stream_forecaster, train_stream_model

FAMILIES = ("lstm_ae", "lstm_forecast")
THRESHOLDS = ("adaptive", "dynamic")


def require_numbers(df: pd.DataFrame, columns: list[str], source: object) -> None:
    """Make `columns` float in place, or raise ConfigError naming the first bad cell (empty, text, inf)."""
    for c in columns:
        values = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ConfigError(f"{source}: column {c!r} row {row + 1} is {df[c].iloc[row]!r}, not a finite number")
        df[c] = values


def require_within(df: pd.DataFrame, column: str, low: float, high: float, source: object) -> None:
    """ConfigError naming the first cell of a numeric `column` outside [low, high]."""
    values = df[column].to_numpy(np.float64)
    bad = (values < low) | (values > high)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"{source}: column {column!r} row {row + 1} is {values[row]:g}, outside {low:g} .. {high:g}")


def require_times(values: pd.Series, source: object, column: str) -> pd.Series:
    """Parsed timestamps, or ConfigError naming the first value that is not one. Times with different UTC
    offsets are instants all the same: they are read in UTC (pandas refuses to mix them otherwise)."""
    try:
        parsed = pd.to_datetime(values, errors="coerce")
    except ValueError:  # mixed offsets
        parsed = pd.to_datetime(values, errors="coerce", utc=True)
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise ConfigError(f"{source}: column {column!r} row {row + 1} is {values.iloc[row]!r}, not a timestamp")
    return parsed


def require_increasing(times: pd.DatetimeIndex, source: object, column: str) -> None:
    """ConfigError naming the first row whose time is not after the row before it: a protocol that splits
    by row order (the first rows train) would otherwise train on the wrong rows and stream time backwards."""
    ns = times.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    bad = np.flatnonzero(np.diff(ns) <= 0)
    if bad.size:
        row = int(bad[0]) + 1
        raise ConfigError(
            f"{source}: column {column!r} row {row + 1} ({times[row]}) is not after row {row} ({times[row - 1]}): "
            "rows must be in time order, one row per time"
        )


def require_labels(df: pd.DataFrame, column: str, source: object) -> None:
    """ConfigError naming the first label that is neither 0 nor 1."""
    values = df[column].to_numpy(np.float64)
    bad = (values != 0) & (values != 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"{source}: column {column!r} row {row + 1} is {values[row]:g}; labels are 0 or 1")


@dataclass
class Scored:
    """Per-event results in the order of the input columns."""

    scores: np.ndarray
    thresholds: np.ndarray
    alerts: np.ndarray  # bool


def take(cols: EventColumns, idx: np.ndarray) -> EventColumns:
    ids = cols.entity_ids
    return EventColumns([ids[i] for i in idx], cols.ts[idx], cols.base[idx])


def concat(parts: list[EventColumns]) -> EventColumns:
    ids: list[str] = []
    for p in parts:
        ids.extend(p.entity_ids)
    return EventColumns(ids, np.concatenate([p.ts for p in parts]), np.concatenate([p.base for p in parts]))


def fit(
    spec: StreamSpec,
    cols: EventColumns,
    model: LSTMAEConfig,
    train: TrainConfig,
    *,
    min_history: int,
    device: str = "cpu",
    name: str,
) -> Checkpoint:
    """Train on `cols` (normal/training events) through the serving path, with a progress bar per epoch."""
    bar = tqdm(total=train.epochs, desc=f"train {name}", file=sys.stderr, leave=False)

    def progress(epoch: int, tl: float, vl: float) -> None:
        bar.set_postfix(train=f"{tl:.4f}", val=f"{vl:.4f}")
        bar.update(1)

    try:
        return train_stream_model(
            spec, cols, model=model, train=train, min_history=min_history, name=name, device=device, progress=progress
        )
    finally:
        bar.close()


def fit_forecaster(
    spec: StreamSpec,
    cols: EventColumns,
    model: LSTMAEConfig,
    params: dict[str, Any],
    *,
    epochs: int,
    seed: int,
    min_history: int,
    device: str = "cpu",
    name: str,
) -> ForecastCheckpoint:
    """The stateful forecasting family on the same features; `params` mixes ForecastConfig and
    ForecastTrainConfig fields; the scored features are the autoencoder config's (the format's choice)."""
    mnames, tnames = {f.name for f in fields(ForecastConfig)}, {f.name for f in fields(ForecastTrainConfig)}
    unknown = set(params) - mnames - tnames
    if unknown:
        raise ConfigError(f"forecast: unknown parameters {sorted(unknown)}")
    mparams = {k: v for k, v in params.items() if k in mnames}
    mparams.setdefault("score_features", model.score_features)
    if mparams["score_features"] is not None:
        mparams["score_features"] = tuple(mparams["score_features"])
    fc = ForecastConfig(**{"n_features": model.n_features, **mparams})
    tc = ForecastTrainConfig(**{"epochs": epochs, "seed": seed, **{k: v for k, v in params.items() if k in tnames}})
    bar = tqdm(total=tc.epochs, desc=f"train {name}", file=sys.stderr, leave=False)

    def progress(epoch: int, tl: float, vl: float) -> None:
        bar.set_postfix(train=f"{tl:.4f}", val=f"{vl:.4f}")
        bar.update(1)

    try:
        return train_stream_forecaster(
            spec, cols, model=fc, train=tc, min_history=min_history, name=name, device=device, progress=progress
        )
    except TooLittleData as exc:  # a training part of a few rows: the user's data, one line (it was a traceback)
        raise ConfigError(f"{name}: the training part is too short to train on ({exc})") from None
    finally:
        bar.close()


def make_threshold(global_threshold: float, cfg: Any) -> Threshold:
    """The format config's threshold method: the adaptive z-threshold or telemanom's dynamic one."""
    method = getattr(cfg, "threshold_method", "adaptive")
    if method == "dynamic":
        return DynamicThreshold(global_threshold, **dict(getattr(cfg, "dynamic", {})))
    if method != "adaptive":
        raise ConfigError(f"threshold_method {method!r}: expected one of {', '.join(THRESHOLDS)}")
    return AdaptiveThreshold(global_threshold, cfg.threshold)


def make_scorer(
    spec: StreamSpec,
    ckpt: Checkpoint | ForecastCheckpoint,
    threshold: Threshold,
    *,
    min_history: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> StreamScorer:
    return StreamScorer(spec, ckpt, threshold=threshold, min_history=min_history, device=device, precision=precision)


KNOBS = frozenset(f.name for f in fields(ThresholdKnobs))


class FormatConfig(Protocol):
    """A format's config dataclass (SkabConfig, NasaConfig, TransactionsConfig): its threshold knobs."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def threshold(self) -> ThresholdKnobs: ...


Config = TypeVar("Config", bound=FormatConfig)


def configured(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """`cfg` with `overrides`; threshold knobs (z, smoothing, ...) are named flat, as on the command lines
    (`--set z=3`, `--threshold '{"z": 3}'`), and land in cfg.threshold."""
    rest = {k: v for k, v in overrides.items() if k not in KNOBS}
    knobs = {k: v for k, v in overrides.items() if k in KNOBS}
    if knobs:
        rest["threshold"] = replace(rest.get("threshold", cfg.threshold), **knobs)
    return replace(cfg, **rest)


def stream(
    scorer: StreamScorer,
    cols: EventColumns,
    *,
    learn: bool = True,
    learn_scores: bool | None = None,
    batch_size: int = 2000,
    desc: str = "score",
) -> Scored:
    """Feed events in event-time order (stable, so each entity keeps its order) in micro-batches."""
    n = len(cols.entity_ids)
    order = np.argsort(cols.ts, kind="stable")
    scores = np.empty(n, np.float64)
    thresholds = np.empty(n, np.float64)
    alerts = np.zeros(n, bool)
    with tqdm(total=n, desc=desc, unit="ev", file=sys.stderr, leave=False, mininterval=0.5) as bar:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            res = scorer.process(take(cols, idx), learn=learn, learn_scores=learn_scores)
            scores[idx], thresholds[idx], alerts[idx] = res.scores, res.thresholds, res.is_anomaly
            bar.update(len(idx))
    return Scored(scores, thresholds, alerts)


def restart_at_test(scorer: StreamScorer, test: EventColumns, cfg: SeriesProtocolConfig) -> None:
    """A format whose test part is a separate recording (`restart_at_test`): its entities start a new sequence
    context there, keeping the scaling and score statistics the training part gave them."""
    if cfg.restart_at_test:
        scorer.restart_context(list(dict.fromkeys(test.entity_ids)))


class SeriesProtocolConfig(Protocol):
    """The knobs of benchmarks whose protocol is 'train part warms each entity, test part is frozen'."""

    @property
    def epochs(self) -> int: ...

    @property
    def seed(self) -> int: ...

    @property
    def threshold(self) -> ThresholdKnobs: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def learn_in_test(self) -> bool: ...

    @property
    def learn_scores_in_test(self) -> bool: ...

    @property
    def restart_at_test(self) -> bool: ...


def train_then_score(
    spec: StreamSpec,
    train: EventColumns,
    test: EventColumns,
    model: LSTMAEConfig,
    cfg: SeriesProtocolConfig,
    *,
    name: str,
    device: str = "cpu",
    model_per_entity: bool = False,
    precision: str = "fp32",
) -> Scored:
    """Fit on the training part, stream it to warm every entity's scaling and thresholds (learning), then
    stream the test part with the scaling frozen unless `learn_in_test` (SKAB's scaler is fitted on its
    training rows) and the score statistics frozen unless `learn_scores_in_test` (label-free adaptation).

    `model_per_entity`: one model per entity, trained on that entity's training events only (telemanom
    trains one per telemetry channel), each served by its own StreamScorer; otherwise one shared model."""
    if not model_per_entity:
        return _train_then_score(spec, train, test, model, cfg, name=name, device=device, precision=precision)
    train_ids = np.asarray(train.entity_ids, dtype=object)
    test_ids = np.asarray(test.entity_ids, dtype=object)
    untrained = sorted(set(test.entity_ids) - set(train.entity_ids))
    if untrained:
        raise ConfigError(
            f"{name}: no training events for {', '.join(map(str, untrained[:5]))}; "
            "a model per entity needs each entity's own training part"
        )
    n = len(test_ids)
    out = Scored(np.empty(n, np.float64), np.empty(n, np.float64), np.zeros(n, bool))
    for entity in tqdm(list(dict.fromkeys(test.entity_ids)), desc=f"{name} models", file=sys.stderr, leave=False):
        tr, te = np.flatnonzero(train_ids == entity), np.flatnonzero(test_ids == entity)
        res = _train_then_score(
            spec,
            take(train, tr),
            take(test, te),
            model,
            cfg,
            name=f"{name} {entity}",
            device=device,
            precision=precision,
        )
        out.scores[te], out.thresholds[te], out.alerts[te] = res.scores, res.thresholds, res.alerts
    return out


def _train_then_score(
    spec: StreamSpec,
    train: EventColumns,
    test: EventColumns,
    model: LSTMAEConfig,
    cfg: SeriesProtocolConfig,
    *,
    name: str,
    device: str,
    precision: str = "fp32",
) -> Scored:
    family = getattr(cfg, "family", "lstm_ae")
    ckpt: Checkpoint | ForecastCheckpoint
    if family == "lstm_forecast":
        ckpt = fit_forecaster(
            spec,
            train,
            model,
            dict(getattr(cfg, "forecast", {})),
            epochs=cfg.epochs,
            seed=cfg.seed,
            min_history=cfg.threshold.min_history,
            device=device,
            name=name,
        )
    elif family == "lstm_ae":
        ckpt = fit(
            spec,
            train,
            model,
            TrainConfig(epochs=cfg.epochs, seed=cfg.seed),
            min_history=cfg.threshold.min_history,
            device=device,
            name=name,
        )
    else:
        raise ConfigError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
    thr = make_threshold(ckpt.threshold, cfg)
    scorer = make_scorer(spec, ckpt, thr, min_history=cfg.threshold.min_history, device=device, precision=precision)
    stream(scorer, train, learn=True, batch_size=cfg.batch_size, desc=f"{name} train part")
    restart_at_test(scorer, test, cfg)
    return stream(
        scorer,
        test,
        learn=cfg.learn_in_test,
        learn_scores=cfg.learn_in_test or cfg.learn_scores_in_test,
        batch_size=cfg.batch_size,
        desc=f"{name} test part",
    )
