"""LSTM autoencoder (EncDec-AD style) with a Mahalanobis error model.

Score of a window = squared Mahalanobis distance of the reconstruction error of its last `score_steps`
time steps (averaged), against a Gaussian fitted on held-out *normal* windows (Malhotra et al. 2016).
Per-feature contributions d_i * (S^-1 d)_i sum to the score, so alerts can say which features drove it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.torch_version import TorchVersion

CHECKPOINT_FORMAT = 1
Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LSTMAEConfig:
    n_features: int
    window: int = 32
    hidden_size: int = 32
    latent_size: int = 16
    num_layers: int = 1
    score_steps: int = 1  # trailing time steps whose errors make the score
    # features whose errors make the score (None = all); the others are context the model reads but does
    # not score, e.g. time-of-day of a payment, which is noise to reconstruct but informs the others
    score_features: tuple[int, ...] | None = None
    # one-sided features (indices into the features): only an error *above* the normal error mean counts,
    # e.g. an unusually high payment amount is suspicious, an unusually low one is not. Default: none.
    upper_features: tuple[int, ...] = ()
    # features scaled by the global training prior instead of per entity (pipeline.state.store): the absolute
    # level matters, e.g. a payment over a fixed amount is suspicious for any customer. Default: none.
    global_features: tuple[int, ...] = ()
    # hide the newest step's scored features from the encoder (they read as the entity mean, 0 scaled), so
    # their error is a prediction error from context and the model cannot copy an anomaly through
    mask_last: bool = False
    # scored features whose scaled *value* (not its reconstruction error) enters the error model: a level
    # rule inside the Mahalanobis score, e.g. a globally scaled amount. Default: none.
    value_features: tuple[int, ...] = ()
    # ignore error correlations (diagonal covariance): the score becomes a sum of per-feature squared
    # z-scores, so two agreeing pieces of evidence add up instead of being discounted as "correlated"
    diagonal_error: bool = False

    def scored(self) -> list[int]:
        return list(range(self.n_features)) if self.score_features is None else list(self.score_features)

    def errors(self, windows: np.ndarray, recon: np.ndarray) -> np.ndarray:
        """Two-sided errors of the last score_steps steps over the scored features: (N, k, S) float64."""
        k, sel = self.score_steps, self.scored()
        err = (windows[:, -k:, sel] - recon[:, -k:, sel]).astype(np.float64)
        if self.value_features:
            val = np.isin(np.asarray(sel), np.asarray(self.value_features, dtype=np.int64))
            err[..., val] = windows[:, -k:, np.asarray(sel)[val]]
        return err

    def upper_mask(self) -> np.ndarray:
        """Bool over the scored features: True where only positive deviations count."""
        return np.isin(np.asarray(self.scored()), np.asarray(self.upper_features, dtype=np.int64))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.2
    threshold_quantile: float = 0.995
    threshold_margin: float = 2.0  # global threshold = margin x quantile of held-out normal scores
    seed: int = 0
    max_windows: int = 200_000  # subsample beyond this; training cost stays bounded
    clip: float | None = None  # gradient-norm clipping (None: off, as the bundled models were trained)


class LSTMAutoencoder(nn.Module):
    def __init__(self, config: LSTMAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoder = nn.LSTM(c.n_features, c.hidden_size, num_layers=c.num_layers, batch_first=True)
        self.to_latent = nn.Linear(c.hidden_size, c.latent_size)
        self.decoder = nn.LSTM(c.latent_size, c.hidden_size, num_layers=c.num_layers, batch_first=True)
        self.to_output = nn.Linear(c.hidden_size, c.n_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, W, F) scaled features -> (B, W, F) reconstruction
        if self.config.mask_last:
            x = x.clone()
            x[:, -1, self.config.scored()] = 0.0
        _, (h, _) = self.encoder(x)  # h: (layers, B, H)
        z = torch.tanh(self.to_latent(h[-1]))  # (B, L)
        z_seq = z.unsqueeze(1).expand(-1, x.shape[1], -1)  # (B, W, L)
        out, _ = self.decoder(z_seq)  # (B, W, H)
        return self.to_output(out)  # (B, W, F)


@dataclass
class ErrorModel:
    """Gaussian of normal reconstruction-error vectors; scores are squared Mahalanobis distances."""

    mean: np.ndarray  # (F,)
    precision: np.ndarray  # (F, F) inverse covariance

    @classmethod
    def fit(cls, errors: np.ndarray, ridge: float = 1e-6, diagonal: bool = False) -> ErrorModel:
        # errors: (N, F)
        mean = errors.mean(axis=0)
        cov = np.cov(errors, rowvar=False).reshape(errors.shape[1], errors.shape[1])
        if diagonal:
            cov = np.diag(np.diag(cov))
        cov = cov + np.eye(cov.shape[0]) * (ridge + 1e-3 * float(np.trace(cov)) / cov.shape[0])
        return cls(mean=mean.astype(np.float64), precision=np.linalg.inv(cov).astype(np.float64))

    def contributions(self, errors: np.ndarray) -> np.ndarray:
        # errors: (N, F) -> (N, F); rows sum to the squared Mahalanobis distance
        d = errors - self.mean
        return np.asarray(d * (d @ self.precision))


@dataclass
class Checkpoint:
    config: LSTMAEConfig
    model: LSTMAutoencoder
    error_model: ErrorModel
    threshold: float
    card: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # what scoring runs at; the weights on disk are always fp32 (see with_precision)
    autocast_dtype: torch.dtype | None = None

    @property
    def version(self) -> str:
        return str(self.card.get("version", "unversioned"))

    def with_precision(self, precision: str, device: torch.device | str = "cpu") -> Checkpoint:
        """A copy that scores at `precision` on `device` (same version, config, error model and threshold).

        CPU: int8 = dynamic quantization of the LSTM and Linear layers (weights int8, activations quantized
        per call); bf16 = autocast, only where the CPU has native bf16 (else fp32, logged: emulated bf16 is
        slow, and oneDNN's LSTM refuses it outright on AVX2-only CPUs). CUDA: bf16 = autocast bf16 (fp16 if
        the GPU lacks bf16); int8 = autocast fp16, since dynamic quantization is CPU-only. The error model,
        thresholds and scores stay float64, so only the reconstruction carries the lower precision."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if precision == self.precision:
            return self
        if self.precision != "fp32":
            raise ValueError(f"checkpoint {self.version} is already converted to {self.precision}")
        dev = torch.device(device)
        if dev.type == "cuda":
            dtype = torch.bfloat16 if precision == "bf16" and torch.cuda.is_bf16_supported() else torch.float16
            if precision == "int8":
                log.info("precision int8 on CUDA: dynamic quantization is CPU-only; using fp16 autocast")
            return _replace(self, precision=precision, autocast_dtype=dtype)
        if precision == "bf16":
            if not cpu_supports_bf16():
                log.warning(
                    "precision bf16 requested but this CPU has no native bf16 (avx512_bf16 / amx); scoring %s in fp32",
                    self.version,
                )
                return self
            return _replace(self, precision="bf16", autocast_dtype=torch.bfloat16)
        with warnings.catch_warnings():  # torch.ao deprecation notices; the API works in the pinned torch
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(self.model).cpu().eval(), {nn.LSTM, nn.Linear}, dtype=torch.qint8
            )
        return _replace(self, model=model, precision="int8")

    def reconstruct(
        self, windows: np.ndarray, device: torch.device | str = "cpu", chunk: int | None = None
    ) -> np.ndarray:
        """windows: (N, W, F) float32 scaled -> reconstruction (N, W, F) float32."""
        chunk = chunk or model_chunk(device)
        out = np.empty_like(windows, dtype=np.float32)
        self.model.eval()
        dev = torch.device(device)
        with (
            torch.inference_mode(),
            torch.autocast(
                dev.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None
            ),
        ):
            for start in range(0, len(windows), chunk):
                x = torch.from_numpy(np.ascontiguousarray(windows[start : start + chunk], dtype=np.float32))
                out[start : start + chunk] = self.model(x.to(dev)).float().cpu().numpy()
        return out

    def score(
        self, windows: np.ndarray, device: torch.device | str = "cpu"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (scores (N,), per-feature contributions (N, F), reconstruction of the last step (N, F))."""
        recon = self.reconstruct(windows, device)
        sel = self.config.scored()
        err = self.config.errors(windows, recon)  # (N, k, S)
        upper = self.config.upper_mask()
        if upper.any():  # below-normal errors of one-sided features count as exactly normal
            mu = self.error_model.mean[upper]
            err[..., upper] = np.maximum(err[..., upper], mu)
        part = self.error_model.contributions(err.reshape(-1, err.shape[-1])).reshape(err.shape).mean(axis=1)
        contrib = np.zeros((len(windows), windows.shape[2]), np.float64)
        contrib[:, sel] = part
        return contrib.sum(axis=1), contrib, recon[:, -1, :]


def _replace(ckpt: Checkpoint, **changes: Any) -> Checkpoint:
    fields = {
        k: getattr(ckpt, k)
        for k in ("config", "model", "error_model", "threshold", "card", "precision", "autocast_dtype")
    }
    return Checkpoint(**{**fields, **changes})


_BF16_CPU: bool | None = None


def cpu_supports_bf16() -> bool:
    """Native bf16 on this CPU: oneDNN's own check (avx512_bf16 / amx_bf16), confirmed by a tiny autocast LSTM
    forward (cached). Without native support autocast would emulate bf16 (slower than fp32) or fail."""
    global _BF16_CPU
    if _BF16_CPU is None:
        ok = False
        try:
            # private: torch has no public check; a torch without it falls back to the CPU flags below
            ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # noqa: SLF001
        except (AttributeError, RuntimeError):
            ok = any(f in _cpu_flags() for f in ("avx512_bf16", "amx_bf16"))
        if ok:
            try:
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    nn.LSTM(4, 4, batch_first=True)(torch.zeros(2, 3, 4))
            except RuntimeError:
                ok = False
        _BF16_CPU = ok
    return _BF16_CPU


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def model_chunk(device: torch.device | str) -> int:
    """Windows per LSTM call. CPU: ~1k keeps the activations in cache (measured 1.4-1.9x faster than 8k
    chunks, docs/results/bench.md); a GPU wants big batches to stay busy."""
    return 1024 if torch.device(device).type == "cpu" else 16384


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


SCORE_QUANTILES = (0.5, 0.9, 0.99, 0.999)  # of held-out normal scores, in the card: the baseline of score drift


def score_quantiles(scores: np.ndarray) -> dict[str, float]:
    return {str(q): float(np.quantile(scores, q)) for q in SCORE_QUANTILES}


def data_hash(windows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.float32).tobytes()).hexdigest()


def train_autoencoder(
    windows: np.ndarray,
    config: LSTMAEConfig,
    train: TrainConfig = TrainConfig(),
    *,
    name: str,
    feature_names: list[str],
    device: torch.device | str = "cpu",
    progress: Callable[[int, float, float], None] | None = None,
    extra_card: dict[str, Any] | None = None,
    held_out: np.ndarray | None = None,
) -> Checkpoint:
    """Train on scaled normal windows (N, W, F); fit the error model and threshold on a held-out split:
    `held_out` windows when given (e.g. the latest of each entity), else a random `val_fraction` of them.

    Deterministic for a seed on CPU. `progress(epoch, train_loss, val_loss)` is called once per epoch.
    """
    if windows.ndim != 3 or windows.shape[1:] != (config.window, config.n_features):
        raise ValueError(f"windows must be (N, {config.window}, {config.n_features}); got {windows.shape}")
    if not np.isfinite(windows).all():
        raise ValueError("training windows contain NaN or inf")
    if held_out is not None and (len(held_out) == 0 or held_out.shape[1:] != windows.shape[1:]):
        raise ValueError(
            f"held-out windows must be (N > 0, {config.window}, {config.n_features}); got {held_out.shape}"
        )
    _seed_everything(train.seed)
    rng = np.random.default_rng(train.seed)
    digest = data_hash(windows)
    if len(windows) > train.max_windows:
        windows = windows[np.sort(rng.choice(len(windows), train.max_windows, replace=False))]
    if held_out is None:
        perm = rng.permutation(len(windows))
        n_val = max(1, int(len(windows) * train.val_fraction))
        val, fit = windows[perm[:n_val]], windows[perm[n_val:]]
    else:
        val, fit = held_out, windows
    if len(fit) == 0:
        raise ValueError("not enough windows to train")

    model = LSTMAutoencoder(config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    x_fit = torch.from_numpy(np.ascontiguousarray(fit, dtype=np.float32))
    x_val = torch.from_numpy(np.ascontiguousarray(val, dtype=np.float32))
    gen = torch.Generator().manual_seed(train.seed)
    started = time.time()
    train_loss = val_loss = math.nan
    for epoch in range(train.epochs):
        model.train()
        order = torch.randperm(len(x_fit), generator=gen)
        total = 0.0
        for start in range(0, len(order), train.batch_size):
            xb = x_fit[order[start : start + train.batch_size]].to(device)
            loss = nn.functional.mse_loss(model(xb), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if train.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), train.clip)
            opt.step()
            total += loss.item() * len(xb)
        train_loss = total / len(x_fit)
        model.eval()
        with torch.inference_mode():
            val_loss = (
                float(
                    sum(
                        nn.functional.mse_loss(
                            model(x_val[s : s + 4096].to(device)), x_val[s : s + 4096].to(device), reduction="sum"
                        )
                        for s in range(0, len(x_val), 4096)
                    )
                )
                / x_val.numel()
            )
        if progress is not None:
            progress(epoch, train_loss, val_loss)

    model = model.cpu().eval()
    ckpt = Checkpoint(config=config, model=model, error_model=ErrorModel(np.zeros(1), np.eye(1)), threshold=0.0)
    recon = ckpt.reconstruct(val)
    val_err = config.errors(val, recon).reshape(-1, len(config.scored()))
    ckpt.error_model = ErrorModel.fit(val_err, diagonal=config.diagonal_error)
    val_scores, _, _ = ckpt.score(val)
    ckpt.threshold = train.threshold_margin * float(np.quantile(val_scores, train.threshold_quantile))
    ckpt.card = {
        "name": name,
        "version": f"{name}@{digest[:10]}-s{train.seed}",
        "architecture": "LSTM autoencoder (encoder LSTM -> latent -> repeated -> decoder LSTM -> linear)",
        "config": asdict(config),
        "training": asdict(train),
        "feature_names": list(feature_names),
        "window": config.window,
        "threshold": ckpt.threshold,
        "threshold_method": f"{train.threshold_margin} x quantile {train.threshold_quantile} of held-out normal scores",
        "score": "squared Mahalanobis distance of last-step reconstruction error (EncDec-AD)",
        "training_data_sha256": digest,
        "n_windows": int(len(windows)),
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


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Writes `<path>` (state_dict + config + error model) and `<path minus .pt>.card.json`."""
    if ckpt.precision != "fp32":
        raise ValueError(
            f"refusing to save a {ckpt.precision} copy of {ckpt.version}: checkpoints stay fp32 "
            "(precision is applied at load)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(ckpt.config),
            "state_dict": ckpt.model.state_dict(),
            "error_mean": torch.from_numpy(ckpt.error_model.mean),
            "error_precision": torch.from_numpy(ckpt.error_model.precision),
            "threshold": ckpt.threshold,
            "card": ckpt.card,
        },
        path,
    )
    path.with_suffix(".card.json").write_text(json.dumps(ckpt.card, indent=2, sort_keys=True) + "\n")
    return path


def load_blob(path: str | Path, map_location: str = "cpu") -> Any:
    """A checkpoint file's contents, with weights_only=True: tensors and plain data, so loading runs no pickled
    code. Files written before the card's torch_version became a plain str hold a TorchVersion (a str
    subclass), which is allowed."""
    with torch.serialization.safe_globals([TorchVersion]):
        return torch.load(Path(path), map_location=map_location, weights_only=True)


def load_checkpoint(path: str | Path, map_location: str = "cpu", precision: str = "fp32") -> Checkpoint:
    """The fp32 checkpoint at `path`, converted to `precision` for CPU scoring (see Checkpoint.with_precision)."""
    return checkpoint_from_blob(load_blob(path, map_location), path, map_location, precision)


def checkpoint_from_blob(blob: Any, path: str | Path, map_location: str = "cpu", precision: str = "fp32") -> Checkpoint:
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {blob.get('format')!r}")
    cfg = dict(blob["config"])
    if cfg.get("score_features") is not None:
        cfg["score_features"] = tuple(cfg["score_features"])
    cfg["upper_features"] = tuple(cfg.get("upper_features", ()))
    cfg["global_features"] = tuple(cfg.get("global_features", ()))
    cfg["value_features"] = tuple(cfg.get("value_features", ()))
    config = LSTMAEConfig(**cfg)
    model = LSTMAutoencoder(config)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    em = ErrorModel(mean=blob["error_mean"].numpy(), precision=blob["error_precision"].numpy())
    ckpt = Checkpoint(
        config=config, model=model, error_model=em, threshold=float(blob["threshold"]), card=dict(blob["card"])
    )
    return ckpt.with_precision(precision, map_location)


def bundled_checkpoint_path(stream: str) -> Path:
    """Path of the checkpoint shipped with the package for `stream` (may not exist yet)."""
    return Path(str(resources.files(__package__).joinpath("checkpoints", f"{stream}.pt")))
