"""Card transactions (Fraud Detection Handbook simulator layout), unsupervised model, delayed feedback.

Customer-keyed TransactionStream with per-terminal context. The model trains on the earlier days without
labels; the last `warm_days` of them are streamed to warm customer state and score statistics, then the
test days are streamed with learning on, as production would run.

Labels enter in one way only, as in the handbook's protocol and in production: as *delayed feedback*
(chargebacks and investigations report fraud `feedback_delay_days` after the payment). Each payment's
label is folded into its terminal's fraud-rate feature once that delay has passed, so a payment is
featurised from labels known at its own time, never later ones. Test labels are otherwise used only for
the metrics.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from models.lstm_ae import LSTMAEConfig, TrainConfig, save_checkpoint
from pipeline.errors import ConfigError
from pipeline.evaluate import common
from pipeline.evaluate.metrics import card_precision_at_k, ranking
from pipeline.features.streams import DAY, EventColumns, TransactionStream
from pipeline.features.terminal import TerminalContext
from pipeline.kafka.partitioning import partitions_of
from pipeline.scoring.knobs import ThresholdKnobs
from pipeline.scoring.threshold import AdaptiveThreshold

COLUMNS = ["TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD"]


@dataclass(frozen=True)
class TransactionsConfig:
    """Hyper-parameters chosen on a split of the training days (docs/results/evaluation.md)."""

    test_fraction: float = 0.2
    warm_days: int = 21
    terminal_context: bool = True
    # label feedback: a payment's label is known this many days after it (None = no feedback feature)
    feedback_delay_days: float | None = 7.0
    feedback_tau_days: float = 3.0  # memory of the terminal fraud rate
    # partitions of the transactions topic the model will be served on: terminal context is per partition
    # (customers hashed as the service's producers key them), so training must see the same split
    partitions: int = 1
    # every label written to every partition of the labels topic (each partition's terminal context then
    # sees all of a terminal's labels, not only those of its own customers)
    label_fanout: bool = True  # chosen on the training days (docs/results/evaluation.md); no-op with 1 partition
    # score (diagonal, one-sided): the customer-relative amount as a prediction error of the LSTM (log_amount,
    # hidden from the encoder at the scored step), the absolute level of the terminal-relative amount
    # (terminal_amount_dev scaled by the global prior) and the terminal's known fraud rate (global level).
    # Chosen on the training days' own split (docs/results/evaluation.md).
    model: dict[str, Any] = field(
        default_factory=lambda: {
            "window": 8,
            "hidden_size": 32,
            "latent_size": 2,
            "score_steps": 1,
            "score_features": (0, 7, 8),
            "upper_features": (0, 7, 8),
            "global_features": (7, 8),
            "value_features": (7, 8),
            "mask_last": True,
            "diagonal_error": True,
        }
    )
    epochs: int = 5
    max_windows: int = 150_000
    seed: int = 0
    threshold: ThresholdKnobs = ThresholdKnobs(min_history=1)
    batch_size: int = 5000
    k: int = 100


def read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise ConfigError(f"--data {path}: no such file or folder")
    if path.is_dir():
        files = sorted([*path.glob("*.csv"), *path.glob("*.csv.gz")])
        if not files:
            raise ConfigError(f"--data {path}: no .csv or .csv.gz file")
        path = files[0] if len(files) == 1 else path
        if path.is_dir():
            return pd.concat([read(f) for f in files], ignore_index=True)
    try:
        df = pd.read_csv(path, usecols=lambda c: c in COLUMNS)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: not a transactions CSV: {exc}") from None
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise ConfigError(f"{path}: missing columns {sorted(missing)}")
    common.require_numbers(df, ["TX_AMOUNT", "TX_FRAUD"], path)
    # the payment schema's bounds: a negative amount has no log1p feature (it ended in a NaN traceback)
    common.require_within(df, "TX_AMOUNT", 0.0, 1e9, path)
    common.require_within(df, "TX_FRAUD", 0.0, 1.0, path)
    df["TX_DATETIME"] = common.require_times(df["TX_DATETIME"], path, "TX_DATETIME")
    return df


def featurize_with_feedback(
    spec: TransactionStream,
    customers: list[str],
    ts: np.ndarray,
    amounts: np.ndarray,
    terminals: list[str],
    fraud: np.ndarray,
    delay_s: float,
    chunk: int = 50_000,
    partitions: np.ndarray | None = None,
    fanout: bool = False,
) -> EventColumns:
    """Features with delayed label feedback, by the service's own mechanism: every payment's label is queued
    (known `delay_s` after the payment, in payment order, in its customer's partition, as a labels topic keyed
    by customer carries it) in the partition's terminal context, which folds each label in just before the
    first payment at or after the time it became known, never earlier. `ts` must be sorted."""
    parts_of = np.zeros(len(ts), np.int32) if partitions is None else partitions
    contexts = {int(p): spec.new_context() for p in np.unique(parts_of).tolist()}
    for p, ctx in contexts.items():
        idx = np.arange(len(ts)) if fanout else np.flatnonzero(parts_of == p)
        ctx.add_labels(np.arange(len(idx)), [terminals[i] for i in idx.tolist()], ts[idx] + delay_s, fraud[idx])
    return _featurize(spec, customers, ts, amounts, terminals, partitions, chunk, contexts)


def _featurize(
    spec: TransactionStream,
    customers: list[str],
    ts: np.ndarray,
    amounts: np.ndarray,
    terminals: list[str] | None,
    partitions: np.ndarray | None,
    chunk: int = 50_000,
    contexts: dict[int, TerminalContext] | None = None,
) -> EventColumns:
    """contexts: each partition's terminal context (new ones unless given), as the service holds them."""
    if contexts is None and spec.terminal_context:
        contexts = {int(p): spec.new_context() for p in np.unique([0] if partitions is None else partitions).tolist()}

    def cut(a: int) -> EventColumns:
        b = a + chunk
        return spec.columns_from_arrays(
            customers[a:b],
            ts[a:b],
            amounts[a:b],
            None if terminals is None else terminals[a:b],
            None if partitions is None else partitions[a:b],
            contexts,
        )

    return common.concat(
        [
            cut(a)
            for a in tqdm(
                range(0, len(ts), chunk), desc="features", unit="chunk", file=sys.stderr, leave=False, mininterval=0.5
            )
        ]
    )


def in_time_order(df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Rows sorted by TX_DATETIME (stable), their epoch seconds and day index (day 0 = the file's first day)."""
    ts = pd.to_datetime(df["TX_DATETIME"]).to_numpy(dtype="datetime64[ns]").astype(np.int64) / 1e9
    order = np.argsort(ts, kind="stable")
    df, ts = df.iloc[order].reset_index(drop=True), ts[order]
    return df, ts, ((ts - np.floor(ts[0] / DAY) * DAY) // DAY).astype(np.int64)


def first_test_day(n_days: int, test_fraction: float) -> int:
    """The protocol's split: the last `test_fraction` of the days (at least one) are the test part."""
    return n_days - max(1, int(round(n_days * test_fraction)))


def evaluate(
    path: Path,
    cfg: TransactionsConfig = TransactionsConfig(),
    *,
    device: str = "cpu",
    save_model: Path | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    df, ts, day = in_time_order(read(path))
    n_days = int(day.max()) + 1
    first_test = first_test_day(n_days, cfg.test_fraction)
    if first_test < 1:
        raise ConfigError(f"--data {path}: {n_days} day(s); need at least 2 to split train/test")
    feedback = cfg.feedback_delay_days is not None
    if feedback and not cfg.terminal_context:
        raise ConfigError("label feedback is a terminal feature: it needs terminal_context")
    spec = TransactionStream(
        terminal_context=cfg.terminal_context, fraud_feedback_tau_s=cfg.feedback_tau_days * DAY if feedback else None
    )
    if cfg.partitions < 1:
        raise ConfigError(f"partitions must be >= 1, got {cfg.partitions}")
    customers = df["CUSTOMER_ID"].astype(str).tolist()
    amounts = df["TX_AMOUNT"].to_numpy(np.float64)
    terminals = df["TERMINAL_ID"].astype(str).tolist() if cfg.terminal_context else None
    partitions = partitions_of(customers, cfg.partitions) if cfg.terminal_context and cfg.partitions > 1 else None
    if cfg.feedback_delay_days is not None and terminals is not None:  # feedback implies terminals (checked above)
        cols = featurize_with_feedback(
            spec,
            customers,
            ts,
            amounts,
            terminals,
            df["TX_FRAUD"].to_numpy(),
            cfg.feedback_delay_days * DAY,
            partitions=partitions,
            fanout=cfg.label_fanout,
        )
    else:
        cols = _featurize(spec, customers, ts, amounts, terminals, partitions)
    train_idx = np.flatnonzero(day < first_test)
    test_idx = np.flatnonzero(day >= first_test)
    warm_idx = np.flatnonzero((day < first_test) & (day >= first_test - cfg.warm_days))
    train = common.take(cols, train_idx)
    model = LSTMAEConfig(n_features=spec.n_features, **cfg.model)
    tcfg = TrainConfig(epochs=cfg.epochs, seed=cfg.seed, max_windows=cfg.max_windows)
    ckpt = common.fit(
        spec, train, model, tcfg, min_history=cfg.threshold.min_history, device=device, name="transactions"
    )
    if cfg.terminal_context:
        ckpt.card["terminal_context_partitions"] = cfg.partitions
        if feedback:
            ckpt.card["label_fanout"] = cfg.label_fanout
    if save_model is not None:
        ckpt.card["training_data"] = f"{path.name}, days 0-{first_test - 1} (labels only as delayed feedback)"
        save_checkpoint(ckpt, save_model)
    scorer = common.make_scorer(
        spec,
        ckpt,
        AdaptiveThreshold(ckpt.threshold, cfg.threshold),
        min_history=cfg.threshold.min_history,
        device=device,
        precision=precision,
    )
    common.stream(scorer, common.take(cols, warm_idx), batch_size=cfg.batch_size, desc="transactions warm-up")
    res = common.stream(scorer, common.take(cols, test_idx), batch_size=cfg.batch_size, desc="transactions test")
    y = df["TX_FRAUD"].to_numpy()[test_idx]
    out = ranking(y, res.scores)
    out["card_precision_at_100" if cfg.k == 100 else f"card_precision_at_{cfg.k}"] = card_precision_at_k(
        day[test_idx], df["CUSTOMER_ID"].to_numpy()[test_idx], res.scores, y, k=cfg.k
    )
    out.update(
        partitions=cfg.partitions,
        train_days=first_test,
        test_days=n_days - first_test,
        test_events=len(test_idx),
        test_frauds=int(y.sum()),
        alert_rate=float(res.alerts.mean()) if len(y) else 0.0,
    )
    return out
