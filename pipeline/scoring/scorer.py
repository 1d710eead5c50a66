"""StreamScorer: per-entity state + one batched model call per micro-batch. Pure: no Kafka, no DB.

A micro-batch may hold several events of one entity; they are applied in *rounds* (round r = every
entity's r-th event in the batch), each round a few vectorised numpy ops, so the result is exactly the
result of feeding the events one at a time, while the LSTM sees all windows of the batch in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.lstm_ae import Checkpoint
from pipeline.errors import ScoringError
from pipeline.features.streams import EventColumns, StreamSpec
from pipeline.scoring.threshold import AdaptiveThreshold
from pipeline.state.store import EntityStateStore, Loader, StateLayout

RAW_CLIP = 1e30  # finite but absurd readings stay finite in float32 windows and float64 statistics
SCALED_CLIP = 50.0  # scaled features beyond +-50 sigma carry no more information; keeps the LSTM finite


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ScoringError("device=cuda requested but torch sees no CUDA device")
    return torch.device(name)


def occurrence_rank(slots: np.ndarray) -> np.ndarray:
    """rank[i] = how many earlier events in the batch belong to the same slot."""
    order = np.argsort(slots, kind="stable")
    s = slots[order]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(s)]))
    rank = np.empty(len(slots), np.int64)
    rank[order] = np.arange(len(s)) - group_start
    return rank


def rounds(rank: np.ndarray) -> list[np.ndarray]:
    if len(rank) == 0:
        return []
    order = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[order], np.arange(int(rank.max()) + 2))
    return [order[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)]


@dataclass
class Prepared:
    slots: np.ndarray  # (N,)
    windows: np.ndarray  # (N, W, F) float32, scaled
    raw: np.ndarray  # (N, F) raw features of each event
    mean: np.ndarray  # (N, F) scaling used
    std: np.ndarray  # (N, F)
    count: np.ndarray  # (N,) entity events including this one
    order: list[np.ndarray]  # rounds


@dataclass
class ScoreBatch:
    slots: np.ndarray
    entity_ids: list[str]
    scores: np.ndarray  # (N,) the score the threshold judged (smoothed when the threshold smooths)
    thresholds: np.ndarray  # (N,)
    is_anomaly: np.ndarray  # (N,) bool
    contributions: np.ndarray  # (N, F)
    observed: np.ndarray  # (N, F) raw features
    reconstructed: np.ndarray  # (N, F) reconstruction in raw units
    raw_scores: np.ndarray  # (N,) the model's score of this event alone


class StreamScorer:
    def __init__(
        self,
        spec: StreamSpec,
        checkpoint: Checkpoint | None,
        *,
        threshold: AdaptiveThreshold | None = None,
        min_history: int = 8,
        device: str | torch.device = "cpu",
        loader: Loader | None = None,
        prior: tuple[np.ndarray, np.ndarray] | None = None,
        window: int | None = None,
        global_features: tuple[int, ...] = (),
    ) -> None:
        """Without a checkpoint (training), `prior`, `window` and `global_features` come from the caller."""
        self.spec = spec
        self.checkpoint = checkpoint
        if checkpoint is not None:
            card = checkpoint.card
            if list(card.get("feature_names", [])) != spec.feature_names:
                raise ScoringError(
                    f"model {checkpoint.version} expects features {card.get('feature_names')}, "
                    f"stream {spec.name} produces {spec.feature_names}"
                )
            prior = prior or (np.asarray(card["feature_prior"]["mean"]), np.asarray(card["feature_prior"]["std"]))
            window = checkpoint.config.window
            global_features = checkpoint.config.global_features
            threshold = threshold or AdaptiveThreshold(checkpoint.threshold)
            self.device = select_device(device) if isinstance(device, str) else device
            checkpoint.model.to(self.device)
        else:
            self.device = torch.device("cpu")
        if prior is None or window is None:
            raise ScoringError("a scorer without a checkpoint needs prior and window")
        self.threshold = threshold
        self.min_history = min_history
        self.store = EntityStateStore(StateLayout(window, spec.n_features), prior[0], prior[1], loader=loader,
                                      global_features=global_features)

    @property
    def model_version(self) -> str:
        return self.checkpoint.version if self.checkpoint is not None else "none"

    def prepare(self, cols: EventColumns, partitions: np.ndarray | None = None, *, learn: bool = True) -> Prepared:
        """Apply a batch to entity state; return each event's scaled window (state ordered as one-at-a-time).

        learn=False still moves the windows but freezes the entities' feature scaling, so a benchmark can
        fit scaling on its training part only (and production can pause learning during an incident).
        """
        store = self.store
        n = len(cols.entity_ids)
        w, f = store.layout.window, store.layout.n_features
        slots = store.resolve(cols.entity_ids, partitions)
        order = rounds(occurrence_rank(slots))
        windows = np.empty((n, w, f), np.float32)
        raw = np.empty((n, f), np.float64)
        mean = np.empty((n, f), np.float64)
        std = np.empty((n, f), np.float64)
        count = np.empty(n, np.int64)
        for idx in order:
            s = slots[idx]
            feats = np.clip(self.spec.finish(cols.base[idx], cols.ts[idx], store.last_ts[s]), -RAW_CLIP, RAW_CLIP)
            store.push(s, feats, cols.ts[idx])
            m, sd = store.scaling(s)
            scaled = (store.windows(s) - m[:, None, :]) / sd[:, None, :]
            windows[idx] = np.clip(scaled, -SCALED_CLIP, SCALED_CLIP)
            raw[idx], mean[idx], std[idx], count[idx] = feats, m, sd, store.count[s]
            if learn:
                store.update_feature_stats(s, feats)
        return Prepared(slots, windows, raw, mean, std, count, order)

    def process(self, cols: EventColumns, partitions: np.ndarray | None = None, *, learn: bool = True,
                learn_scores: bool | None = None) -> ScoreBatch:
        """Score a micro-batch; learn=False freezes feature scaling and score statistics (see `prepare`).

        learn_scores (default: learn) decides separately whether normal scores update the entities' score
        statistics, e.g. frozen scaling (a benchmark's scaler fitted on its training part) with thresholds
        that keep adapting to slow drift of the normal scores, as a long-running service does."""
        learn_scores = learn if learn_scores is None else learn_scores
        if self.checkpoint is None or self.threshold is None:
            raise ScoringError("scorer has no model")
        p = self.prepare(cols, partitions, learn=learn)
        n = len(p.slots)
        if n:
            scores, contrib, recon = self.checkpoint.score(p.windows, self.device)
        else:
            scores, contrib, recon = np.empty(0), np.empty((0, p.raw.shape[1])), np.empty((0, p.raw.shape[1]))
        thresholds = np.empty(n, np.float64)
        anomalous = np.zeros(n, bool)
        raw_scores = scores
        scores = np.empty(n, np.float64)
        for idx in p.order:
            s = p.slots[idx]
            thr = self.threshold.thresholds(self.store, s)
            sc = self.threshold.smooth(self.store, s, raw_scores[idx])
            warm = p.count[idx] >= self.min_history
            anom = warm & (sc > thr)
            if learn_scores:
                self.threshold.observe(self.store, s, sc, warm & ~anom)
            thresholds[idx], anomalous[idx], scores[idx] = thr, anom, sc
        reconstructed = recon * p.std + p.mean
        return ScoreBatch(p.slots, cols.entity_ids, scores, thresholds, anomalous, contrib, p.raw, reconstructed,
                          raw_scores)
