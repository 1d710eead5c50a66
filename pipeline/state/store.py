"""Struct-of-arrays entity state, so a whole micro-batch updates in a few numpy calls.

Each entity owns a slot: a ring buffer of its last W raw feature vectors, Welford statistics of its
features (shrunk towards the model's global statistics while young) and of its normal log-scores.
Snapshots are fixed-size byte blobs (one numpy structured record) so they can be persisted and restored
exactly; a blob whose layout does not match raises StateError instead of silently resetting the entity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import StateError

# v2 added score_ema (the entity's smoothed score); v1 blobs are migrated on load (smoothing restarts)
LAYOUT_VERSION = 2


@dataclass(frozen=True)
class StateLayout:
    window: int
    n_features: int
    # floats of a stateful model's h (and of c) per entity (models.lstm_forecast); 0 = none. When > 0 the
    # record also holds h, c and the entity's last prediction of its next (scaled) reading
    recurrent: int = 0

    def dtype_of(self, version: int) -> np.dtype:
        w, f = self.window, self.n_features
        fields: list[tuple[str, str] | tuple[str, str, tuple[int, ...]]] = [
            ("version", "<u2"),
            ("window", "<u2"),
            ("n_features", "<u2"),
            ("count", "<i8"),
            ("last_ts", "<f8"),
            ("win", "<f4", (w, f)),  # oldest -> newest
            ("feat_n", "<f8"),
            ("feat_mean", "<f8", (f,)),
            ("feat_m2", "<f8", (f,)),
            ("score_n", "<f8"),
            ("score_mean", "<f8"),
            ("score_m2", "<f8"),
        ]
        if version >= 2:
            fields.append(("score_ema", "<f8"))
        if self.recurrent:
            fields += [
                ("rnn_h", "<f4", (self.recurrent,)),
                ("rnn_c", "<f4", (self.recurrent,)),
                ("rnn_pred", "<f4", (f,)),
            ]
        return np.dtype(fields)

    @property
    def dtype(self) -> np.dtype:
        return self.dtype_of(LAYOUT_VERSION)

    @property
    def blob_size(self) -> int:
        return int(self.dtype.itemsize)


Loader = Callable[[Sequence[str]], dict[str, bytes]]


# every per-slot array of EntityStateStore besides the window ring `win`: one list for growth, byte
# accounting and the scorer's undo savepoint (an array missing here would be silently left out of all three)
SLOT_ARRAYS = (
    "pos",
    "count",
    "last_ts",
    "feat_n",
    "feat_mean",
    "feat_m2",
    "score_n",
    "score_mean",
    "score_m2",
    "score_ema",
    "rnn_h",
    "rnn_c",
    "rnn_pred",
    "last_seen",
    "dirty",
    "partition",
)


class EntityStateStore:
    """Slots for live entities; `resolve` maps ids to slots, creating (or loading) the missing ones."""

    def __init__(
        self,
        layout: StateLayout,
        prior_mean: np.ndarray,
        prior_std: np.ndarray,
        *,
        prior_strength: float = 20.0,
        clip_sigma: float = 4.0,
        capacity: int = 1024,
        loader: Loader | None = None,
        global_features: Sequence[int] = (),
    ) -> None:
        self.layout = layout
        w, f = layout.window, layout.n_features
        self.prior_mean = np.asarray(prior_mean, dtype=np.float64).reshape(f)
        self.prior_var = np.maximum(np.asarray(prior_std, dtype=np.float64).reshape(f), 1e-6) ** 2
        self.prior_strength = float(prior_strength)
        # features always scaled by the global prior (their absolute level is the evidence), not per entity
        self.global_features = np.asarray(sorted(set(global_features)), dtype=np.int64)
        if self.global_features.size and (self.global_features.min() < 0 or self.global_features.max() >= f):
            raise ValueError(f"global_features {list(global_features)} out of range for {f} features")
        self.clip_sigma = float(clip_sigma)
        self.loader = loader
        self._slot_of: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        cap = max(16, capacity)
        self.win = np.zeros((cap, w, f), np.float32)
        self.pos = np.zeros(cap, np.int64)  # next write index in the ring
        self.count = np.zeros(cap, np.int64)
        self.last_ts = np.zeros(cap, np.float64)
        self.feat_n = np.zeros(cap, np.float64)
        self.feat_mean = np.zeros((cap, f), np.float64)
        self.feat_m2 = np.zeros((cap, f), np.float64)
        self.score_n = np.zeros(cap, np.float64)
        self.score_mean = np.zeros(cap, np.float64)
        self.score_m2 = np.zeros(cap, np.float64)
        self.score_ema = np.full(cap, np.nan)  # EWMA of log1p(score); NaN until the entity's first score
        r = layout.recurrent  # stateful models: (h, c) and the last prediction (NaN until the first step)
        self.rnn_h = np.zeros((cap, r), np.float32)
        self.rnn_c = np.zeros((cap, r), np.float32)
        self.rnn_pred = np.full((cap, f if r else 0), np.nan, np.float32)
        self.last_seen = np.zeros(cap, np.float64)
        self.dirty = np.zeros(cap, bool)
        self.partition = np.full(cap, -1, np.int32)

    # -- slots -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, entity_id: str) -> bool:
        return entity_id in self._slot_of

    @property
    def capacity(self) -> int:
        return len(self.pos)

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        if needed <= cap:
            return
        new = max(needed, cap * 2)
        for name in ("win", *SLOT_ARRAYS):
            old = getattr(self, name)
            arr = np.zeros((new, *old.shape[1:]), old.dtype)
            if name == "partition":
                arr[:] = -1
            elif name in ("score_ema", "rnn_pred"):
                arr[:] = np.nan
            arr[:cap] = old
            setattr(self, name, arr)

    def savepoint(self, slots: np.ndarray, rank: np.ndarray) -> Callable[[], None]:
        """Undo for a batch about to be applied to `slots` (resolved; rank = each event's occurrence rank among
        the batch's events of its slot): the slots' per-slot values and the window rows the batch's pushes can
        overwrite (an entity's k-th event writes ring row pos + k; an entity with no event yet refills its
        whole window, so new entities' windows are saved whole)."""
        ring = (self.pos[slots] + rank) % self.layout.window
        rows = self.win[slots, ring]
        fresh = slots[self.count[slots] == 0]
        fresh_win = self.win[fresh]
        saved = [(name, getattr(self, name)[slots]) for name in SLOT_ARRAYS]

        def restore() -> None:
            self.win[slots, ring] = rows
            self.win[fresh] = fresh_win
            for name, values in saved:
                getattr(self, name)[slots] = values

        return restore

    def _new_slot(self, entity_id: str) -> int:
        if self._free:
            slot = self._free.pop()
            self._ids[slot] = entity_id
        else:
            slot = len(self._ids)
            self._grow(slot + 1)
            self._ids.append(entity_id)
        self._slot_of[entity_id] = slot
        self._reset_slot(slot)
        return slot

    def _reset_slot(self, slot: int) -> None:
        self.win[slot] = 0
        self.pos[slot] = 0
        self.count[slot] = 0
        self.last_ts[slot] = np.nan
        self.feat_n[slot] = 0
        self.feat_mean[slot] = 0
        self.feat_m2[slot] = 0
        self.score_n[slot] = 0
        self.score_mean[slot] = 0
        self.score_m2[slot] = 0
        self.score_ema[slot] = np.nan
        self.rnn_h[slot] = 0
        self.rnn_c[slot] = 0
        self.rnn_pred[slot] = np.nan
        self.dirty[slot] = False
        self.partition[slot] = -1

    def resolve(self, entity_ids: Sequence[str], partitions: np.ndarray | None = None) -> np.ndarray:
        """Slots for `entity_ids` (batch order); unknown ids are loaded via `loader` or start fresh."""
        slot_of = self._slot_of
        missing = list(dict.fromkeys(e for e in entity_ids if e not in slot_of))
        if missing:
            blobs = self.loader(missing) if self.loader is not None else {}
            for eid in missing:
                slot = self._new_slot(eid)
                blob = blobs.get(eid)
                if blob is not None:
                    self._restore_slot(slot, blob, eid)
        slots = np.fromiter((slot_of[e] for e in entity_ids), dtype=np.int64, count=len(entity_ids))
        if partitions is not None:
            self.partition[slots] = partitions
        return slots

    def entity_ids(self, slots: Iterable[int]) -> list[str]:
        return [self._ids[s] or "" for s in slots]

    def live_slots(self) -> np.ndarray:
        return np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))

    # -- per-event updates (vectorised over distinct slots) ------------------------------------------
    def push(self, slots: np.ndarray, features: np.ndarray, ts: np.ndarray) -> None:
        """Append one feature vector per slot (slots must be distinct). New entities fill their window."""
        fresh = self.count[slots] == 0
        if fresh.any():
            self.win[slots[fresh]] = features[fresh][:, None, :].astype(np.float32)
        p = self.pos[slots]
        self.win[slots, p] = features
        self.pos[slots] = (p + 1) % self.layout.window
        self.count[slots] += 1
        self.last_ts[slots] = ts
        self.last_seen[slots] = ts
        self.dirty[slots] = True

    def scaling(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Entity mean/std shrunk towards the global prior: (B, F), (B, F)."""
        n = self.feat_n[slots][:, None]
        k = self.prior_strength
        mean_e = self.feat_mean[slots]
        mean = (n * mean_e + k * self.prior_mean) / (n + k)
        var = (self.feat_m2[slots] + k * self.prior_var + n * k / (n + k) * (mean_e - self.prior_mean) ** 2) / (n + k)
        std = np.sqrt(np.maximum(var, 0.01 * self.prior_var))
        g = self.global_features
        if g.size:
            mean[:, g] = self.prior_mean[g]
            std[:, g] = np.sqrt(self.prior_var[g])
        return mean, std

    def update_feature_stats(self, slots: np.ndarray, features: np.ndarray) -> None:
        """Welford update with each value clipped to clip_sigma of the current scaling (robust to bursts)."""
        mean, std = self.scaling(slots)
        x = np.clip(features, mean - self.clip_sigma * std, mean + self.clip_sigma * std)
        n = self.feat_n[slots] + 1
        m = self.feat_mean[slots]
        delta = x - m
        m_new = m + delta / n[:, None]
        self.feat_m2[slots] += delta * (x - m_new)
        self.feat_mean[slots] = m_new
        self.feat_n[slots] = n

    def windows(self, slots: np.ndarray) -> np.ndarray:
        """Raw windows oldest -> newest: (B, W, F)."""
        w = self.layout.window
        idx = (self.pos[slots][:, None] + np.arange(w)[None, :]) % w  # (B, W)
        return self.win[slots[:, None], idx]

    def score_threshold(
        self, slots: np.ndarray, global_threshold: float, warmup: int, z: float, floor_ratio: float
    ) -> np.ndarray:
        n = self.score_n[slots]
        std = np.sqrt(self.score_m2[slots] / np.maximum(n - 1, 1))
        own = np.expm1(self.score_mean[slots] + z * std)
        own = np.maximum(own, floor_ratio * global_threshold)
        return np.where(n >= warmup, own, global_threshold)

    def smooth_scores(self, slots: np.ndarray, scores: np.ndarray, alpha: float) -> np.ndarray:
        """EWMA of each entity's log1p-scores (slots distinct): a persistent fault accumulates, a one-off blip
        fades, and one absurd score cannot hold the average up for long (log scale, like the threshold's
        statistics). Returns the smoothed scores in score units. alpha = 1 (no smoothing, the default) returns
        the raw scores and keeps no average: nothing reads it, and the hot path need not pay for it."""
        if alpha >= 1.0:
            return scores
        x = np.log1p(np.maximum(scores, 0.0))
        prev = self.score_ema[slots]
        smoothed = np.where(np.isnan(prev), x, alpha * x + (1.0 - alpha) * prev)
        self.score_ema[slots] = smoothed
        return np.asarray(np.expm1(smoothed))

    def update_score_stats(self, slots: np.ndarray, scores: np.ndarray) -> None:
        x = np.log1p(np.maximum(scores, 0.0))
        n = self.score_n[slots] + 1
        m = self.score_mean[slots]
        delta = x - m
        m_new = m + delta / n
        self.score_m2[slots] += delta * (x - m_new)
        self.score_mean[slots] = m_new
        self.score_n[slots] = n

    # -- snapshots -----------------------------------------------------------------------------------
    def snapshot(self, slots: np.ndarray) -> list[bytes]:
        """Fixed-size blobs for `slots` (one structured record each)."""
        rec = np.zeros(len(slots), self.layout.dtype)
        rec["version"] = LAYOUT_VERSION
        rec["window"] = self.layout.window
        rec["n_features"] = self.layout.n_features
        rec["count"] = self.count[slots]
        rec["last_ts"] = self.last_ts[slots]
        rec["win"] = self.windows(slots)
        rec["feat_n"] = self.feat_n[slots]
        rec["feat_mean"] = self.feat_mean[slots]
        rec["feat_m2"] = self.feat_m2[slots]
        rec["score_n"] = self.score_n[slots]
        rec["score_mean"] = self.score_mean[slots]
        rec["score_m2"] = self.score_m2[slots]
        rec["score_ema"] = self.score_ema[slots]
        if self.layout.recurrent:
            rec["rnn_h"], rec["rnn_c"], rec["rnn_pred"] = self.rnn_h[slots], self.rnn_c[slots], self.rnn_pred[slots]
        buf = rec.tobytes()
        size = self.layout.blob_size
        return [buf[i * size : (i + 1) * size] for i in range(len(slots))]

    def _restore_slot(self, slot: int, blob: bytes, entity_id: str) -> None:
        version = int(np.frombuffer(blob[:2], "<u2")[0]) if len(blob) >= 2 else -1
        if version not in (1, LAYOUT_VERSION) or len(blob) != self.layout.dtype_of(version).itemsize:
            raise StateError(
                f"state of {entity_id!r}: {len(blob)} bytes of layout v{version}; this model needs "
                f"v{LAYOUT_VERSION} with {self.layout.blob_size} bytes (window={self.layout.window} "
                f"features={self.layout.n_features}). Migrate or start a new run_id."
            )
        rec = np.frombuffer(blob, self.layout.dtype_of(version))[0]
        if (int(rec["window"]), int(rec["n_features"])) != (self.layout.window, self.layout.n_features):
            raise StateError(
                f"state of {entity_id!r} was saved with layout v{rec['version']} window={rec['window']} "
                f"features={rec['n_features']}; this model needs window={self.layout.window} "
                f"features={self.layout.n_features}. Migrate or start a new run_id."
            )
        self.win[slot] = rec["win"]
        self.pos[slot] = 0
        self.count[slot] = rec["count"]
        self.last_ts[slot] = rec["last_ts"]
        self.last_seen[slot] = rec["last_ts"]
        self.feat_n[slot] = rec["feat_n"]
        self.feat_mean[slot] = rec["feat_mean"]
        self.feat_m2[slot] = rec["feat_m2"]
        self.score_n[slot] = rec["score_n"]
        self.score_mean[slot] = rec["score_mean"]
        self.score_m2[slot] = rec["score_m2"]
        self.score_ema[slot] = rec["score_ema"] if version >= 2 else np.nan
        if self.layout.recurrent:
            self.rnn_h[slot], self.rnn_c[slot], self.rnn_pred[slot] = rec["rnn_h"], rec["rnn_c"], rec["rnn_pred"]

    def dirty_slots(self, partition: int | None = None) -> np.ndarray:
        live = self.live_slots()
        mask = self.dirty[live]
        if partition is not None:
            mask &= self.partition[live] == partition
        return live[mask]

    def mark_clean(self, slots: np.ndarray) -> None:
        self.dirty[slots] = False

    # -- memory bounds ---------------------------------------------------------------------------------
    def drop(self, entity_ids: Iterable[str]) -> int:
        """Forget entities (e.g. their partition was revoked); their state lives on in the snapshot store."""
        n = 0
        for eid in entity_ids:
            slot = self._slot_of.pop(eid, None)
            if slot is not None:
                self._ids[slot] = None
                self._reset_slot(slot)
                self._free.append(slot)
                n += 1
        return n

    def drop_partition(self, partition: int) -> int:
        live = self.live_slots()
        return self.drop(self.entity_ids(live[self.partition[live] == partition]))

    def evict_idle(self, now: float, ttl: float, max_live: int) -> int:
        """Evict clean entities idle longer than ttl (event time), then the least recent clean ones over max_live."""
        live = self.live_slots()
        if len(live) == 0:
            return 0
        clean = live[~self.dirty[live]]
        idle = clean[self.last_seen[clean] < now - ttl]
        victims = list(idle)
        over = len(live) - len(victims) - max_live
        if over > 0:
            rest = np.setdiff1d(clean, idle)
            victims.extend(rest[np.argsort(self.last_seen[rest])[:over]])
        return self.drop(self.entity_ids(victims))

    def nbytes_per_entity(self) -> float:
        """Array bytes per slot (excludes the id map; bench measures the whole process)."""
        return sum(getattr(self, name).nbytes for name in ("win", *SLOT_ARRAYS)) / max(1, self.capacity)
