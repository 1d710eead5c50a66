"""Stateful forecasting LSTM (telemanom LSTM-DT spirit): one LSTM step per event, per-entity (h, c).

The model reads an entity's scaled readings one at a time and predicts the next one. Serving keeps each
entity's (h, c) and last prediction in its state (pipeline.state.store), so an event costs one LSTM step
(batched across entities) instead of re-encoding a window, and the context is the whole history, not W
steps. The score of an event is the squared Mahalanobis distance (diagonal by default) of its prediction
error over the scored features, against a Gaussian fitted on held-out *normal* errors, as lstm_ae does.

Training: each entity's sequence is cut into segments trained in parallel; each segment is unrolled in
chunks of `tbptt` steps with the state carried (detached) between chunks (truncated BPTT), gradients
clipped. The error model and the global threshold come from the tail of every entity's sequence, scored
with the state carried from its head, i.e. as serving would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.lstm_ae import ErrorModel, score_quantiles


class TooLittleData(ValueError):  # noqa: N818 - reads as what it says where it is caught
    """The training sequences are too short to train on or to fit the error model: the caller's input, not a
    bug (the CLI reports it in one line)."""


FAMILY = "lstm_forecast"
CHECKPOINT_FORMAT = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForecastConfig:
    n_features: int
    hidden_size: int = 64
    num_layers: int = 1
    # features whose prediction errors make the score (None = all); the others are read as context
    score_features: tuple[int, ...] | None = None
    diagonal_error: bool = True  # score = sum of per-feature squared z-scores of the prediction error
    # the serving state keeps a ring of the last `window` raw readings (1: only the newest; the LSTM state
    # carries the context) and scales features per entity like the autoencoder family; no global features
    window: int = 1
    global_features: tuple[int, ...] = ()

    def scored(self) -> list[int]:
        return list(range(self.n_features)) if self.score_features is None else list(self.score_features)

    @property
    def state_size(self) -> int:
        """Floats of h (or c) per entity: num_layers x hidden_size."""
        return self.num_layers * self.hidden_size


@dataclass(frozen=True)
class ForecastTrainConfig:
    epochs: int = 30
    tbptt: int = 64  # steps per backward pass; the state is carried (detached) between chunks
    segment: int = 512  # steps per parallel training sequence (an entity's series is cut into these)
    batch_size: int = 64  # segments per optimizer batch
    lr: float = 3e-3
    clip: float = 1.0  # gradient-norm clipping
    val_fraction: float = 0.2  # tail of every entity's sequence that fits the error model and threshold
    burn_in: int = 16  # steps of an entity before its prediction errors count (fresh state)
    # an entity's early life after burn_in, whose errors (its scaling statistics still settling, its state young)
    # calibrate the threshold a new entity is judged by until it has its own statistics (serving's warmup, 30)
    young_steps: int = 32
    threshold_quantile: float = 0.995
    threshold_margin: float = 2.0
    seed: int = 0


class LSTMForecaster(nn.Module):
    def __init__(self, config: ForecastConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.lstm = nn.LSTM(c.n_features, c.hidden_size, num_layers=c.num_layers, batch_first=True)
        self.head = nn.Linear(c.hidden_size, c.n_features)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # x: (B, T, F) scaled readings; state: h, c each (layers, B, H)
        # -> predictions (B, T, F) where out[:, t] predicts x[:, t + 1], and the final (h, c)
        out, (h, c) = self.lstm(x, state)  # out: (B, T, H)
        return self.head(out), (h, c)


@dataclass
class ForecastCheckpoint:
    config: ForecastConfig
    model: LSTMForecaster
    error_model: ErrorModel
    threshold: float
    card: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"

    family = FAMILY

    @property
    def version(self) -> str:
        return str(self.card.get("version", "unversioned"))

    @property
    def state_size(self) -> int:
        return self.config.state_size

    @property
    def burn_in(self) -> int:
        """Steps of an entity before its prediction errors count: training left the earlier ones (a fresh
        state) out of the error model and threshold, so serving does not judge them either."""
        return int(self.card.get("training", {}).get("burn_in", ForecastTrainConfig.burn_in))

    @property
    def young_threshold(self) -> float:
        """The threshold for an entity still warming up: calibrated like `threshold` but on the errors of the
        entities' early life (steps burn_in .. burn_in + young_steps), which run higher than the settled tails'
        while an entity's scaling statistics settle; never below `threshold`. Cards without it: `threshold`."""
        return max(float(self.card.get("young_threshold", self.threshold)), self.threshold)

    @property
    def cold_threshold(self) -> float | None:
        """The threshold for an entity whose sequence context restarted while its scaling is established (a
        newly promoted version's fresh (h, c), a gap): calibrated on the errors of steps 2 .. burn_in from a
        fresh state, which run far above the settled ones, so only a gross fault passes it; never below
        `young_threshold`. Cards without it (trained before it existed): None, such steps are not judged."""
        cold = self.card.get("cold_threshold")
        return None if cold is None else max(float(cold), self.young_threshold)

    def with_precision(self, precision: str, device: torch.device | str = "cpu") -> ForecastCheckpoint:
        """int8: dynamic quantization of the LSTM and head (CPU); bf16 is not worth it for one step of a
        64-unit LSTM, so it scores in fp32 (logged)."""
        if precision == self.precision or precision == "bf16" or torch.device(device).type != "cpu":
            if precision not in (self.precision, "fp32"):
                log.info("precision %s for %s: the forecasting family scores in fp32 here", precision, self.version)
            return self
        if precision != "int8":
            raise ValueError(f"precision must be fp32, bf16 or int8; got {precision!r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(self.model).cpu().eval(), {nn.LSTM, nn.Linear}, dtype=torch.qint8
            )
        return ForecastCheckpoint(self.config, model, self.error_model, self.threshold, self.card, "int8")

    def step(
        self, x: np.ndarray, h: np.ndarray, c: np.ndarray, device: torch.device | str = "cpu"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One LSTM step for N entities. x: (N, F) scaled; h, c: (N, layers * H) float32
        -> prediction of each entity's next reading (N, F), new h, new c (N, layers * H)."""
        n, layers, hidden = len(x), self.config.num_layers, self.config.hidden_size
        self.model.eval()
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device).unsqueeze(1)  # (N, 1, F)
            h0 = torch.from_numpy(np.ascontiguousarray(h, dtype=np.float32)).to(device)
            c0 = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)).to(device)
            # (N, layers*H) -> (layers, N, H)
            h0 = h0.reshape(n, layers, hidden).transpose(0, 1).contiguous()
            c0 = c0.reshape(n, layers, hidden).transpose(0, 1).contiguous()
            pred, (h1, c1) = self.model(xt, (h0, c0))
            return (
                pred[:, 0].float().cpu().numpy(),
                h1.transpose(0, 1).reshape(n, layers * hidden).float().cpu().numpy(),
                c1.transpose(0, 1).reshape(n, layers * hidden).float().cpu().numpy(),
            )

    def score_errors(self, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prediction errors over the scored features (N, S) -> scores (N,), contributions (N, F)."""
        part = self.error_model.contributions(err.astype(np.float64))
        contrib = np.zeros((len(err), self.config.n_features), np.float64)
        contrib[:, self.config.scored()] = part
        return contrib.sum(axis=1), contrib


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _segments(seqs: Sequence[np.ndarray], length: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut sequences into segments of `length` (the first one shorter by `offset`), zero-padded:
    -> x (B, length, F) float32, valid mask (B, length) bool."""
    parts: list[np.ndarray] = []
    for s in seqs:
        cuts = [0, *range(offset if 0 < offset < len(s) else length, len(s), length)]
        parts.extend(s[a:b] for a, b in zip(cuts, [*cuts[1:], len(s)], strict=True) if b - a >= 2)
    f = seqs[0].shape[1]
    x = np.zeros((len(parts), length, f), np.float32)
    mask = np.zeros((len(parts), length), bool)
    for i, p in enumerate(parts):
        x[i, : len(p)] = p
        mask[i, : len(p)] = True
    return x, mask


def _errors(
    model: LSTMForecaster,
    seqs: Sequence[np.ndarray],
    start: Sequence[int],
    burn_in: int,
    scored: list[int],
    device: torch.device | str,
    stop: int | None = None,
) -> np.ndarray:
    """Prediction errors (scored features) of steps >= max(start_i, burn_in) (and < stop, if given), state
    carried from step 0."""
    out = []
    model.eval()
    with torch.inference_mode():
        for s, a in zip(seqs, start, strict=True):
            pred, _ = model(torch.from_numpy(np.ascontiguousarray(s[:stop], np.float32)).unsqueeze(0).to(device))
            err = s[1:stop] - pred[0, :-1].float().cpu().numpy()  # err[t-1] = error of step t
            first = max(a, burn_in, 1)
            out.append(err[first - 1 :, scored])
    return np.concatenate(out) if out else np.empty((0, len(scored)))


def held_out_start(length: int, val_fraction: float) -> int:
    """Where the held-out tail of an entity's sequence of `length` steps begins."""
    return max(2, int(round(length * (1.0 - val_fraction))))


def train_forecaster(
    sequences: Sequence[np.ndarray],
    config: ForecastConfig,
    train: ForecastTrainConfig = ForecastTrainConfig(),
    *,
    name: str,
    feature_names: list[str],
    device: torch.device | str = "cpu",
    progress: Callable[[int, float, float], None] | None = None,
    extra_card: dict[str, Any] | None = None,
) -> ForecastCheckpoint:
    """Train on per-entity scaled *normal* sequences [(T_e, F)]; deterministic for a seed on CPU."""
    seqs = [np.asarray(s, np.float32) for s in sequences if len(s) >= 2]
    if not seqs:
        raise TooLittleData("no entity sequence with at least 2 steps to train on")
    if any(s.ndim != 2 or s.shape[1] != config.n_features for s in seqs):
        raise ValueError(f"sequences must be (T, {config.n_features})")
    if not all(np.isfinite(s).all() for s in seqs):
        raise ValueError("training sequences contain NaN or inf")
    _seed_everything(train.seed)
    rng = np.random.default_rng(train.seed)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(s).tobytes() for s in seqs)).hexdigest()
    # the tail of each entity's sequence is held out (its head still warms the state when scoring it)
    cut = [held_out_start(len(s), train.val_fraction) for s in seqs]
    fit = [s[:k] for s, k in zip(seqs, cut, strict=True)]

    model = LSTMForecaster(config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=train.lr)
    gen = torch.Generator().manual_seed(train.seed)
    started = time.time()
    train_loss = val_loss = math.nan
    scored = config.scored()
    for epoch in range(train.epochs):
        model.train()
        x, mask = _segments(fit, train.segment, int(rng.integers(0, train.segment)))
        order = torch.randperm(len(x), generator=gen).numpy()
        total, count = 0.0, 0
        for b in range(0, len(order), train.batch_size):
            idx = np.sort(order[b : b + train.batch_size])
            xb = torch.from_numpy(x[idx]).to(device)  # (B, segment, F)
            mb = torch.from_numpy(mask[idx]).to(device)
            state = None
            for t in range(0, train.segment - 1, train.tbptt):
                inp = xb[:, t : t + train.tbptt]  # (B, k, F)
                tgt = xb[:, t + 1 : t + train.tbptt + 1]  # (B, k', F), k' = k or k - 1 at the end
                valid = mb[:, t : t + train.tbptt][:, : tgt.shape[1]] & mb[:, t + 1 : t + tgt.shape[1] + 1]
                pred, state = model(inp, state)
                state = (state[0].detach(), state[1].detach())  # truncated BPTT: carry the value, not the graph
                n_valid = int(valid.sum())
                if n_valid == 0:
                    continue
                se = ((pred[:, : tgt.shape[1]] - tgt) ** 2).mean(dim=2)  # (B, k')
                loss = (se * valid).sum() / n_valid
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), train.clip)
                opt.step()
                total += float(loss.item()) * n_valid
                count += n_valid
        train_loss = total / max(count, 1)
        val_err = _errors(model, seqs, cut, train.burn_in, list(range(config.n_features)), device)
        val_loss = float(np.mean(val_err**2)) if len(val_err) else math.nan
        if progress is not None:
            progress(epoch, train_loss, val_loss)

    model = model.cpu().eval()
    val_err = _errors(model, seqs, cut, train.burn_in, scored, "cpu").astype(np.float64)
    if len(val_err) < 2:
        raise TooLittleData("not enough held-out steps to fit the error model")
    ckpt = ForecastCheckpoint(config, model, ErrorModel.fit(val_err, diagonal=config.diagonal_error), 0.0)
    val_scores, _ = ckpt.score_errors(val_err)
    ckpt.threshold = train.threshold_margin * float(np.quantile(val_scores, train.threshold_quantile))
    # early life: every entity's steps burn_in .. burn_in + young_steps, with the state carried from its step 0
    young_err = _errors(model, seqs, [0] * len(seqs), train.burn_in, scored, "cpu", train.burn_in + train.young_steps)
    young = ckpt.threshold
    if len(young_err):
        young_scores, _ = ckpt.score_errors(young_err.astype(np.float64))
        young = max(young, train.threshold_margin * float(np.quantile(young_scores, train.threshold_quantile)))
    # a sequence context restarted (a promoted version's fresh state, a gap): steps 2 .. burn_in, state from step 0
    cold_err = _errors(model, seqs, [0] * len(seqs), 2, scored, "cpu", train.burn_in)
    cold = None
    if len(cold_err):
        cold_scores, _ = ckpt.score_errors(cold_err.astype(np.float64))
        cold = max(young, train.threshold_margin * float(np.quantile(cold_scores, train.threshold_quantile)))
    ckpt.card = {
        "name": name,
        "family": FAMILY,
        "version": f"{name}@{digest[:10]}-s{train.seed}",
        "architecture": "stateful LSTM forecaster (per-entity (h, c) carried across events) -> linear head",
        "config": asdict(config),
        "training": asdict(train),
        "feature_names": list(feature_names),
        "window": config.window,
        "threshold": ckpt.threshold,
        "threshold_method": f"{train.threshold_margin} x quantile {train.threshold_quantile} of held-out normal scores",
        "young_threshold": young,
        **({"cold_threshold": cold} if cold is not None else {}),
        "score": "squared Mahalanobis distance of the one-step prediction error (LSTM-DT)",
        "training_data_sha256": digest,
        "n_sequences": len(seqs),
        "n_steps": int(sum(len(s) for s in seqs)),
        "metrics": {
            "train_mse": train_loss,
            "val_mse": val_loss,
            "val_score_p50": float(np.quantile(val_scores, 0.5)),
            "val_score_p99": float(np.quantile(val_scores, 0.99)),
            "val_score_quantiles": score_quantiles(val_scores),
            "train_seconds": round(time.time() - started, 2),
        },
        "torch_version": str(torch.__version__),  # a plain str: loadable with weights_only=True
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra_card or {}),
    }
    return ckpt


def save_forecaster(ckpt: ForecastCheckpoint, path: str | Path) -> Path:
    """Writes `<path>` (family + config + state_dict + error model + card; loadable with weights_only=True)
    and `<path minus .pt>.card.json`."""
    if ckpt.precision != "fp32":
        raise ValueError(f"refusing to save a {ckpt.precision} copy of {ckpt.version}: checkpoints stay fp32")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = asdict(ckpt.config)
    cfg["score_features"] = None if cfg["score_features"] is None else list(cfg["score_features"])
    cfg["global_features"] = list(cfg["global_features"])
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "family": FAMILY,
            "config": cfg,
            "state_dict": ckpt.model.state_dict(),
            "error_mean": torch.from_numpy(ckpt.error_model.mean),
            "error_precision": torch.from_numpy(ckpt.error_model.precision),
            "threshold": float(ckpt.threshold),
            "card": json.loads(json.dumps(ckpt.card)),
        },
        path,
    )
    path.with_suffix(".card.json").write_text(json.dumps(ckpt.card, indent=2, sort_keys=True) + "\n")
    return path


def from_blob(blob: dict[str, Any], source: object = "checkpoint") -> ForecastCheckpoint:
    if blob.get("family") != FAMILY or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{source}: not a {FAMILY} checkpoint of format {CHECKPOINT_FORMAT}")
    cfg = dict(blob["config"])
    if cfg.get("score_features") is not None:
        cfg["score_features"] = tuple(cfg["score_features"])
    cfg["global_features"] = tuple(cfg.get("global_features", ()))
    config = ForecastConfig(**cfg)
    model = LSTMForecaster(config)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    em = ErrorModel(mean=blob["error_mean"].numpy(), precision=blob["error_precision"].numpy())
    return ForecastCheckpoint(config, model, em, float(blob["threshold"]), dict(blob["card"]))


def load_forecaster(path: str | Path, map_location: str = "cpu", precision: str = "fp32") -> ForecastCheckpoint:
    blob = torch.load(Path(path), map_location=map_location, weights_only=True)
    return from_blob(blob, path).with_precision(precision, map_location)


def load_model(path: str | Path, map_location: str = "cpu", precision: str = "fp32") -> Any:
    """Either family's checkpoint, by the family its file names (autoencoder files name none)."""
    from models.lstm_ae import checkpoint_from_blob, load_blob

    blob = load_blob(path, map_location)
    if isinstance(blob, dict) and blob.get("family") == FAMILY:
        return from_blob(blob, path).with_precision(precision, map_location)
    return checkpoint_from_blob(blob, path, map_location, precision)
