"""Training orchestration: stream events -> the same per-entity state/scaling as serving -> windows -> model.

Windows are built by the serving code path (StreamScorer.prepare), so train/serve skew is impossible
by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from models.lstm_ae import Checkpoint, LSTMAEConfig, TrainConfig, save_checkpoint, train_autoencoder
from models.lstm_forecast import ForecastCheckpoint, ForecastConfig, ForecastTrainConfig, train_forecaster
from pipeline.features.streams import EventColumns, StreamSpec, TransactionStream
from pipeline.scoring.scorer import StreamScorer
from pipeline.state.rounds import occurrence_rank, rounds


def raw_features(spec: StreamSpec, cols: EventColumns) -> np.ndarray:
    """Finished raw features in event order (state-dependent ones use each entity's previous event)."""
    entity_codes = np.unique(np.asarray(cols.entity_ids, dtype=object), return_inverse=True)[1]
    last_ts = np.full(int(entity_codes.max()) + 1 if len(entity_codes) else 0, np.nan)
    out = np.empty_like(cols.base)
    for idx in rounds(occurrence_rank(entity_codes)):
        e = entity_codes[idx]
        out[idx] = spec.finish(cols.base[idx], cols.ts[idx], last_ts[e])
        last_ts[e] = cols.ts[idx]
    return out


def feature_prior(spec: StreamSpec, cols: EventColumns) -> tuple[np.ndarray, np.ndarray]:
    feats = raw_features(spec, cols)
    return feats.mean(axis=0), np.maximum(feats.std(axis=0), 1e-6)


def training_windows(
    spec: StreamSpec,
    cols: EventColumns,
    window: int,
    prior: tuple[np.ndarray, np.ndarray],
    min_history: int,
    chunk: int = 20000,
    global_features: tuple[int, ...] = (),
) -> np.ndarray:
    return windows_with_rows(spec, cols, window, prior, min_history, chunk, global_features)[0]


def windows_with_rows(
    spec: StreamSpec,
    cols: EventColumns,
    window: int,
    prior: tuple[np.ndarray, np.ndarray],
    min_history: int,
    chunk: int = 20000,
    global_features: tuple[int, ...] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """The scaled window of every event whose entity has `min_history` events, and that event's row in `cols`."""
    scorer = StreamScorer(spec, None, prior=prior, window=window, global_features=global_features)
    out, rows = [], []
    n = len(cols.entity_ids)
    for s in range(0, n, chunk):
        part = EventColumns(cols.entity_ids[s : s + chunk], cols.ts[s : s + chunk], cols.base[s : s + chunk])
        p = scorer.prepare(part)
        keep = p.count >= min_history
        out.append(p.windows[keep])
        rows.append(s + np.flatnonzero(keep))
    if not out:
        return np.empty((0, window, spec.n_features), np.float32), np.empty(0, np.int64)
    return np.concatenate(out), np.concatenate(rows)


def train_stream_model(
    spec: StreamSpec,
    cols: EventColumns,
    *,
    model: LSTMAEConfig | None = None,
    train: TrainConfig = TrainConfig(),
    min_history: int = 8,
    name: str | None = None,
    device: str = "cpu",
    progress: Callable[[int, float, float], None] | None = None,
    extra_card: dict[str, Any] | None = None,
    held_out_rows: np.ndarray | None = None,
) -> Checkpoint:
    """held_out_rows: (N,) bool over `cols`; the windows of those events calibrate the error model and
    threshold instead of a random share of all windows."""
    model = model or LSTMAEConfig(n_features=spec.n_features)
    prior = feature_prior(spec, cols)
    windows, rows = windows_with_rows(
        spec, cols, model.window, prior, min_history, global_features=model.global_features
    )
    held_out = None
    if held_out_rows is not None:
        tail = held_out_rows[rows]
        windows, held_out = windows[~tail], windows[tail]
    card: dict[str, Any] = {
        "stream": spec.name,
        "feature_prior": {"mean": prior[0].tolist(), "std": prior[1].tolist()},
        "min_history": min_history,
    }
    if isinstance(spec, TransactionStream) and spec.terminal_context:  # the service rebuilds the stream from these
        card["terminal_tau_s"] = spec.terminal_tau_s
        if spec.fraud_feedback_tau_s is not None:
            card["fraud_feedback_tau_s"] = spec.fraud_feedback_tau_s
    card.update(extra_card or {})
    return train_autoencoder(
        windows,
        model,
        train,
        name=name or f"{spec.name}-lstm-ae",
        feature_names=spec.feature_names,
        device=device,
        progress=progress,
        extra_card=card,
        held_out=held_out,
    )


def train_default_models(
    out_dir: Path,
    channels: list[str],
    *,
    seed: int = 0,
    epochs: int = 8,
    progress: Callable[[str, int, float, float], None] | None = None,
    only: Collection[str] | None = None,
) -> dict[str, Path]:
    """Small models trained on simulated *normal* traffic: what `pipeline demo` and the tests start from.
    only: these streams' models (the others' files are left as they are); default both."""
    from pipeline.features.streams import SensorStream
    from pipeline.simulate import simulate_sensors, simulate_transactions, strip_labels

    paths: dict[str, Path] = {}
    tx_spec = TransactionStream()
    sn_spec = SensorStream(channels)
    # Payments: the LSTM reads gaps and time of day as context but only the amount's error is scored
    # (gap and clock errors are mostly noise and cost precision); margin chosen on simulated validation seeds.
    tx_cfg = LSTMAEConfig(n_features=tx_spec.n_features, window=16, hidden_size=32, latent_size=8, score_features=(0,))
    sn_cfg = LSTMAEConfig(n_features=sn_spec.n_features, window=32, hidden_size=32, latent_size=8)
    jobs: list[tuple[StreamSpec, EventColumns, LSTMAEConfig, float]] = []  # only the streams asked for are simulated
    if only is None or tx_spec.name in only:
        tx, _ = simulate_transactions(400, 80, seed=seed + 11)
        jobs.append((tx_spec, tx_spec.columns([tx_spec.parse(r) for r in strip_labels(tx)]), tx_cfg, 2.5))
    if only is None or sn_spec.name in only:
        sn, _ = simulate_sensors(24, 400, seed=seed + 12)
        jobs.append((sn_spec, sn_spec.columns([sn_spec.parse(r) for r in strip_labels(sn)]), sn_cfg, 2.0))
    for spec, cols, cfg, margin in jobs:

        def report(epoch: int, tl: float, vl: float, _name: str = spec.name) -> None:
            if progress:
                progress(_name, epoch, tl, vl)

        ckpt = train_stream_model(
            spec,
            cols,
            model=cfg,
            train=TrainConfig(epochs=epochs, seed=seed, threshold_margin=margin),
            progress=report,
            extra_card={"training_data": "pipeline.simulate (normal only)"},
        )
        paths[spec.name] = save_checkpoint(ckpt, out_dir / f"{spec.name}.pt")
    return paths


def training_sequences(
    spec: StreamSpec, cols: EventColumns, prior: tuple[np.ndarray, np.ndarray], chunk: int = 20000
) -> list[np.ndarray]:
    """Each entity's scaled readings in event order, scaled as serving scales them (StreamScorer.prepare)."""
    scorer = StreamScorer(spec, None, prior=prior, window=1)
    scaled = np.empty((len(cols.entity_ids), spec.n_features), np.float32)
    for s in range(0, len(cols.entity_ids), chunk):
        part = EventColumns(cols.entity_ids[s : s + chunk], cols.ts[s : s + chunk], cols.base[s : s + chunk])
        scaled[s : s + chunk] = scorer.prepare(part).windows[:, -1, :]
    ids = np.asarray(cols.entity_ids, dtype=object)
    return [scaled[ids == e] for e in dict.fromkeys(cols.entity_ids)]


def train_stream_forecaster(
    spec: StreamSpec,
    cols: EventColumns,
    *,
    model: ForecastConfig | None = None,
    train: ForecastTrainConfig = ForecastTrainConfig(),
    min_history: int = 8,
    name: str | None = None,
    device: str = "cpu",
    progress: Callable[[int, float, float], None] | None = None,
    extra_card: dict[str, Any] | None = None,
) -> ForecastCheckpoint:
    """The stateful forecasting family (models.lstm_forecast), trained on the serving path's scaling."""
    model = model or ForecastConfig(n_features=spec.n_features)
    prior = feature_prior(spec, cols)
    card: dict[str, Any] = {
        "stream": spec.name,
        "min_history": min_history,
        "feature_prior": {"mean": prior[0].tolist(), "std": prior[1].tolist()},
    }
    card.update(extra_card or {})
    return train_forecaster(
        training_sequences(spec, cols, prior),
        model,
        train,
        name=name or f"{spec.name}-lstm-forecast",
        feature_names=spec.feature_names,
        device=device,
        progress=progress,
        extra_card=card,
    )
