"""StreamScorer: per-entity state + one batched model call per micro-batch. Pure: no Kafka, no DB.

A micro-batch may hold several events of one entity; they are applied in *rounds* (round r = every
entity's r-th event in the batch), each round a few vectorised numpy ops, so the result is exactly the
result of feeding the events one at a time, while the LSTM sees all windows of the batch in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from models.lstm_ae import Checkpoint
from models.lstm_forecast import ForecastCheckpoint
from pipeline.errors import ScoringError
from pipeline.features.streams import EventColumns, StreamSpec
from pipeline.scoring.threshold import AdaptiveThreshold, Threshold
from pipeline.state.rounds import occurrence_rank, rounds
from pipeline.state.store import EntityStateStore, StateLayout

RAW_CLIP = 1e30  # finite but absurd readings stay finite in float32 windows and float64 statistics
SCALED_CLIP = 50.0  # scaled features beyond +-50 sigma carry no more information; keeps the LSTM finite


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ScoringError("device=cuda requested but torch sees no CUDA device")
    return torch.device(name)


@dataclass
class Prepared:
    slots: np.ndarray  # (N,)
    windows: np.ndarray  # (N, W, F) float32, scaled
    raw: np.ndarray  # (N, F) raw features of each event
    mean: np.ndarray  # (N, F) scaling used
    std: np.ndarray  # (N, F)
    count: np.ndarray  # (N,) entity events including this one
    order: list[np.ndarray]  # rounds
    late: np.ndarray | None = None  # (N,) bool: behind its entity by <= allowed lateness, state not updated
    rejected: np.ndarray | None = None  # (N,) bool: behind by more (out of order): not scored, state not updated


@dataclass
class ScoreBatch:
    slots: np.ndarray
    entity_ids: list[str]
    scores: np.ndarray  # (N,) the score the threshold judged (smoothed when the threshold smooths)
    thresholds: np.ndarray  # (N,)
    is_anomaly: np.ndarray  # (N,) bool
    contributions: np.ndarray  # (N, F)
    observed: np.ndarray  # (N, F) raw features, as sent (unclipped)
    reconstructed: np.ndarray  # (N, F) reconstruction in raw units
    raw_scores: np.ndarray  # (N,) the model's score of this event alone
    late: np.ndarray | None = None  # see Prepared; None = no lateness policy or no late event
    rejected: np.ndarray | None = None  # out-of-order events: never anomalous, their outputs are meaningless

    def take(self, idx: np.ndarray) -> ScoreBatch:
        """The events at `idx` (e.g. without the rejected ones)."""
        pick = [self.entity_ids[i] for i in idx.tolist()]
        return replace(
            self,
            slots=self.slots[idx],
            entity_ids=pick,
            scores=self.scores[idx],
            thresholds=self.thresholds[idx],
            is_anomaly=self.is_anomaly[idx],
            contributions=self.contributions[idx],
            observed=self.observed[idx],
            reconstructed=self.reconstructed[idx],
            raw_scores=self.raw_scores[idx],
            late=None if self.late is None else self.late[idx],
            rejected=None if self.rejected is None else self.rejected[idx],
        )


class StreamScorer:
    def __init__(
        self,
        spec: StreamSpec,
        checkpoint: Checkpoint | ForecastCheckpoint | None,
        *,
        threshold: Threshold | None = None,
        min_history: int = 8,
        device: str | torch.device = "cpu",
        prior: tuple[np.ndarray, np.ndarray] | None = None,
        window: int | None = None,
        global_features: tuple[int, ...] = (),
        precision: str | None = None,
        allowed_lateness_s: float | None = None,
        context_gap_s: float | None = None,
    ) -> None:
        """Without a checkpoint (training), `prior`, `window` and `global_features` come from the caller.
        precision (fp32 | bf16 | int8; None = as the checkpoint is) converts a copy of the model at load.
        allowed_lateness_s: an event whose time is behind its entity's latest by at most this much is scored
        without updating the entity's state; one further behind is rejected (not scored, see ScoreBatch).
        None (offline evaluation, training) = no policy: every event is the entity's next step.
        context_gap_s: an event more than this far after its entity's previous one starts a new sequence
        context (EntityStateStore.restart_context: scaling and score statistics kept). None = never."""
        self.spec = spec
        self.allowed_lateness_s = allowed_lateness_s
        self.context_gap_s = context_gap_s
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
            if precision is not None and precision != getattr(checkpoint, "precision", "fp32"):
                if not hasattr(checkpoint, "with_precision"):
                    raise ScoringError(f"model {checkpoint.version} supports fp32 scoring only, not {precision}")
                self.checkpoint = checkpoint = checkpoint.with_precision(precision, self.device)
            checkpoint.model.to(self.device)
        else:
            self.device = torch.device("cpu")
        if prior is None or window is None:
            raise ScoringError("a scorer without a checkpoint needs prior and window")
        self.threshold: Threshold | None = threshold
        self.min_history = min_history
        # a stateful model (models.lstm_forecast) keeps each entity's (h, c) in the state records
        recurrent = int(getattr(checkpoint, "state_size", 0)) if checkpoint is not None else 0
        self.store = EntityStateStore(
            StateLayout.of_model(window, spec.feature_names, recurrent, checkpoint.version if checkpoint else ""),
            prior[0],
            prior[1],
            global_features=global_features,
        )

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
        lateness = self.allowed_lateness_s
        late = rejected = None
        for idx in order:
            s = slots[idx]
            round_idx, finished = idx, self.spec.finish(cols.base[idx], cols.ts[idx], store.last_ts[s])
            feats = np.clip(finished, -RAW_CLIP, RAW_CLIP)
            if lateness is not None:
                behind = store.last_ts[s] - cols.ts[idx]  # NaN (never late) for an entity's first event
                back = behind > 0.0
                if back.any():
                    if late is None or rejected is None:
                        late, rejected = np.zeros(n, bool), np.zeros(n, bool)
                    rej = behind > lateness
                    ok = back & ~rej
                    self._late(idx[ok], s[ok], feats[ok], windows, mean, std, count)
                    late[idx[ok]] = True
                    r = idx[rej]  # out of order: not scored (neutral placeholders), the caller drops them
                    rejected[r] = True
                    windows[r], mean[r], std[r], count[r] = 0.0, 0.0, 1.0, 0
                    idx, s, feats = idx[~back], s[~back], feats[~back]
            if self.context_gap_s is not None:
                gap = cols.ts[idx] - store.last_ts[s] > self.context_gap_s  # NaN (first event): False
                if gap.any():
                    store.restart_context(s[gap])
            store.push(s, feats, cols.ts[idx])
            m, sd = store.scaling(s)
            scaled = (store.windows(s) - m[:, None, :]) / sd[:, None, :]
            windows[idx] = np.clip(scaled, -SCALED_CLIP, SCALED_CLIP)
            mean[idx], std[idx], count[idx] = m, sd, store.count[s]
            if learn:
                store.update_feature_stats(s, feats)
            raw[round_idx] = finished  # every event of the round (late, rejected too): as sent, not clipped
        return Prepared(slots, windows, raw, mean, std, count, order, late, rejected)

    def _late(
        self,
        idx: np.ndarray,
        s: np.ndarray,
        feats: np.ndarray,
        windows: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        count: np.ndarray,
    ) -> None:
        """Late events (distinct slots): the window the event would have made as the entity's next step, under
        the entity's current scaling, without writing anything to the entity's state."""
        store = self.store
        m, sd = store.scaling(s)
        win = np.concatenate([store.windows(s)[:, 1:], feats[:, None, :].astype(np.float32)], axis=1)
        windows[idx] = np.clip((win - m[:, None, :]) / sd[:, None, :], -SCALED_CLIP, SCALED_CLIP)
        mean[idx], std[idx], count[idx] = m, sd, store.count[s] + 1

    def restart_context(self, entity_ids: list[str]) -> None:
        """These entities' next events start a new sequence (see EntityStateStore.restart_context)."""
        self.store.restart_context(self.store.resolve(entity_ids))

    def savepoint(self, entity_ids: list[str], partitions: np.ndarray | None = None) -> Callable[[], None]:
        """Undo for a batch of these entities about to be processed: if processing raises, the caller restores
        the entities' state and can retry parts of the batch without applying an event twice (the service
        isolates a failing record that way); it may also undo a batch that succeeded, to re-run part of it.
        Costs one gather of the touched slots (about 1 ms per 5,000 events)."""
        return self.store.savepoint(self.store.resolve(entity_ids, partitions))

    def process(
        self,
        cols: EventColumns,
        partitions: np.ndarray | None = None,
        *,
        learn: bool = True,
        learn_scores: bool | None = None,
    ) -> ScoreBatch:
        """Score a micro-batch; learn=False freezes feature scaling and score statistics (see `prepare`).

        learn_scores (default: learn) decides separately whether normal scores update the entities' score
        statistics, e.g. frozen scaling (a benchmark's scaler fitted on its training part) with thresholds
        that keep adapting to slow drift of the normal scores, as a long-running service does."""
        learn_scores = learn if learn_scores is None else learn_scores
        if self.checkpoint is None or self.threshold is None:
            raise ScoringError("scorer has no model")
        p = self.prepare(cols, partitions, learn=learn)
        n = len(p.slots)
        if n and isinstance(self.checkpoint, ForecastCheckpoint):
            scores, contrib, recon = self._forecast_scores(p, self.checkpoint)
        elif n and not isinstance(self.checkpoint, ForecastCheckpoint):
            scores, contrib, recon = self.checkpoint.score(p.windows, self.device)
        else:
            scores, contrib, recon = np.empty(0), np.empty((0, p.raw.shape[1])), np.empty((0, p.raw.shape[1]))
        thresholds = np.empty(n, np.float64)
        anomalous = np.zeros(n, bool)
        raw_scores = scores
        scores = np.empty(n, np.float64)
        held = None if p.late is None or p.rejected is None else p.late | p.rejected  # leave the statistics alone
        stats = self.store.score_stats()
        cold_threshold = self.checkpoint.cold_threshold if isinstance(self.checkpoint, ForecastCheckpoint) else None
        for idx in p.order:
            s = p.slots[idx]
            warm = p.count[idx] >= self.min_history
            round_held = None if held is None else held[idx]
            eligible = warm if p.rejected is None else warm & ~p.rejected[idx]
            verdict = self.threshold.classify(stats, s, raw_scores[idx], eligible, round_held)
            if learn_scores:
                normal = warm & ~verdict.is_anomaly
                self.threshold.observe(stats, s, verdict.scores, normal if round_held is None else normal & ~round_held)
            scores[idx], thresholds[idx], anomalous[idx] = verdict
            if cold_threshold is not None:
                self._judge_cold(idx, s, p, warm, cold_threshold, raw_scores, scores, thresholds, anomalous)
        reconstructed = recon * p.std + p.mean
        return ScoreBatch(
            p.slots,
            cols.entity_ids,
            scores,
            thresholds,
            anomalous,
            contrib,
            p.raw,
            reconstructed,
            raw_scores,
            p.late,
            p.rejected,
        )

    def _judge_cold(
        self,
        idx: np.ndarray,
        slots: np.ndarray,
        p: Prepared,
        warm: np.ndarray,
        cold_threshold: float,
        raw_scores: np.ndarray,
        scores: np.ndarray,
        thresholds: np.ndarray,
        anomalous: np.ndarray,
    ) -> None:
        """A forecaster's entity whose sequence context restarted while its scaling was established (a promoted
        or rolled-back version's fresh (h, c), a context gap) is judged during the burn-in by the model's cold
        threshold on its raw score, not left unjudged: a swap no longer leaves every entity unwatched for its
        next burn_in events. A brand-new entity (scaling still the prior's) waits out its burn-in as before."""
        # readings its scaling had learnt before this context began: each event adds one to both counts, so
        # the difference is the same for every event of the batch (batched == one at a time)
        before = self.store.feat_n[slots] - self.store.count[slots]
        cold = ~warm & (p.count[idx] >= 2) & (before >= self.min_history)
        if p.late is not None and p.rejected is not None:
            cold &= ~(p.late[idx] | p.rejected[idx])
        if not cold.any():
            return
        at = idx[cold]
        scores[at], thresholds[at] = raw_scores[at], cold_threshold
        anomalous[at] = raw_scores[at] > cold_threshold

    def _forecast_scores(self, p: Prepared, ckpt: ForecastCheckpoint) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stateful family: per round, score each event by the error of the prediction its entity made at its
        previous event, then advance the entity's (h, c) by one LSTM step (batched across the round's
        entities). An entity's first event has no prediction yet and scores 0."""
        store = self.store
        n, f = p.raw.shape
        scores = np.zeros(n, np.float64)
        contrib = np.zeros((n, f), np.float64)
        recon = np.empty((n, f), np.float64)  # the prediction of the reading, scaled (the caller unscales)
        sel = ckpt.config.scored()
        for idx in p.order:
            s = p.slots[idx]
            x = p.windows[idx, -1, :]  # (R, F) the events' scaled readings
            prev = store.rnn_pred[s]  # (R, F) what each entity predicted for this reading
            has = ~np.isnan(prev[:, 0])
            recon[idx] = np.where(has[:, None], prev, x)
            if has.any():
                err = x[has][:, sel] - prev[has][:, sel]
                scores[idx[has]], contrib[idx[has]] = ckpt.score_errors(err)
            pred, h, c = ckpt.step(x, store.rnn_h[s], store.rnn_c[s], self.device)
            if p.late is not None and p.rejected is not None:  # late or rejected events do not advance it
                adv = ~(p.late[idx] | p.rejected[idx])
                s, pred, h, c = s[adv], pred[adv], h[adv], c[adv]
            store.rnn_pred[s], store.rnn_h[s], store.rnn_c[s] = pred, h, c
        return scores, contrib, recon
