"""SKAB (Skoltech Anomaly Benchmark) with the SKAB repo's outlier protocol.

Each anomalous CSV is one experiment and one entity. Its first `train_rows` rows are the training part:
they train the (shared) model and, streamed through the scorer with learning on, fit the entity's
feature scaling and its normal-score statistics. The rest is streamed with learning frozen, so scaling
and thresholds come from the training rows only, as the protocol's scaler does. Point-wise metrics are
pooled over all test rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.lstm_ae import LSTMAEConfig
from pipeline.errors import ConfigError
from pipeline.evaluate import common
from pipeline.evaluate.metrics import pointwise
from pipeline.features.streams import EventColumns, SensorStream

LABEL, CHANGEPOINT = "anomaly", "changepoint"
SUBSETS = ("valve1", "valve2", "other")


@dataclass(frozen=True)
class SkabConfig:
    """Hyper-parameters chosen on validation sets built from training rows only (docs/results/evaluation.md)."""

    train_rows: int = 400
    model: dict[str, Any] = field(default_factory=lambda: {"window": 32, "hidden_size": 32, "latent_size": 8,
                                                           "score_steps": 8})
    epochs: int = 30
    seed: int = 0
    z: float = 4.0
    warmup: int = 30
    floor_ratio: float = 0.0
    smoothing: float = 1.0
    min_history: int = 8
    batch_size: int = 2000


def find_files(path: Path) -> list[Path]:
    """valve1/, valve2/, other/ CSVs (SKAB layout); else every labeled CSV under `path` (or `path` itself)."""
    if not path.exists():
        raise ConfigError(f"--data {path}: no such file or folder")
    if path.is_file():
        return [path]
    files = [f for sub in SUBSETS for f in sorted((path / sub).glob("*.csv"), key=_natural)]
    if not files:
        files = [f for f in sorted(path.rglob("*.csv"), key=_natural) if "anomaly-free" not in f.parts]
    if not files:
        raise ConfigError(f"--data {path}: no SKAB CSVs (expected valve1/, valve2/, other/ with ';'-separated CSVs)")
    return files


def _natural(p: Path) -> tuple[str, int, str]:
    return (str(p.parent), int(p.stem) if p.stem.isdigit() else -1, p.stem)


def read(file: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(file, sep=";", index_col="datetime", parse_dates=True)
    except (ValueError, pd.errors.ParserError) as exc:
        raise ConfigError(f"{file}: not a SKAB CSV (';'-separated with a datetime column): {exc}") from None
    if LABEL not in df.columns:
        raise ConfigError(f"{file}: no '{LABEL}' column")
    return df


def load(path: Path, train_rows: int) -> tuple[list[str], EventColumns, EventColumns, np.ndarray]:
    """-> channels, training events, test events, test labels."""
    channels: list[str] | None = None
    train, test, labels = [], [], []
    root = path if path.is_dir() else path.parent
    for f in find_files(path):
        df = read(f)
        cols = [c for c in df.columns if c not in (LABEL, CHANGEPOINT)]
        if channels is None:
            channels = cols
        elif cols != channels:
            raise ConfigError(f"{f}: channels {cols} differ from {channels}")
        if len(df) <= train_rows:
            raise ConfigError(f"{f}: {len(df)} rows; the protocol needs more than {train_rows}")
        entity = "-".join(f.relative_to(root).with_suffix("").parts)
        ts = (df.index.to_numpy(dtype="datetime64[ns]").astype(np.int64) / 1e9).astype(np.float64)
        x = df[cols].to_numpy(np.float64)
        ids = [entity] * len(df)
        train.append(EventColumns(ids[:train_rows], ts[:train_rows], x[:train_rows]))
        test.append(EventColumns(ids[train_rows:], ts[train_rows:], x[train_rows:]))
        labels.append(df[LABEL].to_numpy()[train_rows:] > 0)
    assert channels is not None
    return channels, common.concat(train), common.concat(test), np.concatenate(labels)


def evaluate(path: Path, cfg: SkabConfig = SkabConfig(), *, device: str = "cpu") -> dict[str, Any]:
    channels, train, test, y = load(path, cfg.train_rows)
    spec = SensorStream(channels)
    model = LSTMAEConfig(n_features=len(channels), **cfg.model)
    res = common.train_then_score(spec, train, test, model, cfg, name="skab", device=device)
    out = pointwise(y, res.alerts)
    out.update(files=len(set(test.entity_ids)), train_events=len(train.entity_ids), test_events=len(y))
    return out
