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
from pipeline.state.rounds import occurrence_rank

LAYOUT_VERSION = 2  # see SLOT_ARRAYS


@dataclass(frozen=True)
class StateLayout:
    window: int
    n_features: int
    # floats of a stateful model's h (and of c) per entity (models.lstm_forecast); 0 = none. When > 0 the
    # record also holds h, c and the entity's last prediction of its next (scaled) reading
    recurrent: int = 0

    def dtype_of(self, version: int) -> np.dtype:
        fields: list[tuple[str, str] | tuple[str, str, tuple[int, ...]]] = [
            ("version", "<u2"),
            ("window", "<u2"),
            ("n_features", "<u2"),
        ]
        fields += [(a.name, a.dtype, a.dims(self)) for a in SLOT_ARRAYS if a.persisted_in(self, version)]
        return np.dtype(fields)

    @property
    def dtype(self) -> np.dtype:
        return self.dtype_of(LAYOUT_VERSION)

    @property
    def blob_size(self) -> int:
        return int(self.dtype.itemsize)


@dataclass(frozen=True)
class SlotArray:
    """One per-entity array of EntityStateStore: its dtype, per-slot shape and the value of an empty slot, and
    whether (since which layout version) the snapshot record holds it."""

    name: str
    dtype: str
    dims: Callable[[StateLayout], tuple[int, ...]]
    fresh: float = 0.0
    persisted_since: int | None = None  # None: memory only
    recurrent: bool = False  # only stateful models persist it

    def persisted_in(self, layout: StateLayout, version: int) -> bool:
        since = self.persisted_since
        return since is not None and since <= version and (layout.recurrent > 0 or not self.recurrent)


def _one(layout: StateLayout) -> tuple[int, ...]:
    return ()


def _features(layout: StateLayout) -> tuple[int, ...]:
    return (layout.n_features,)


def _recurrent(layout: StateLayout) -> tuple[int, ...]:
    return (layout.recurrent,)


def _prediction(layout: StateLayout) -> tuple[int, ...]:
    return (layout.n_features if layout.recurrent else 0,)


RING = "win"  # the window ring (oldest -> newest in snapshots, which restore it with pos = 0)

# The per-entity state layout, written once: it drives allocation, growth, slot reset, the undo savepoint,
# byte accounting and the snapshot record (persisted arrays, in record order). v2 added score_ema (the
# entity's smoothed score); v1 blobs are migrated on load (smoothing restarts).
SLOT_ARRAYS = (
    SlotArray("count", "<i8", _one, persisted_since=1),
    SlotArray("last_ts", "<f8", _one, fresh=np.nan, persisted_since=1),
    SlotArray(RING, "<f4", lambda layout: (layout.window, layout.n_features), persisted_since=1),
    SlotArray("feat_n", "<f8", _one, persisted_since=1),
    SlotArray("feat_mean", "<f8", _features, persisted_since=1),
    SlotArray("feat_m2", "<f8", _features, persisted_since=1),
    SlotArray("score_n", "<f8", _one, persisted_since=1),
    SlotArray("score_mean", "<f8", _one, persisted_since=1),
    SlotArray("score_m2", "<f8", _one, persisted_since=1),
    SlotArray("score_ema", "<f8", _one, fresh=np.nan, persisted_since=2),  # EWMA of log1p(score); NaN until scored
    SlotArray("rnn_h", "<f4", _recurrent, persisted_since=1, recurrent=True),
    SlotArray("rnn_c", "<f4", _recurrent, persisted_since=1, recurrent=True),
    SlotArray("rnn_pred", "<f4", _prediction, fresh=np.nan, persisted_since=1, recurrent=True),  # NaN: no step yet
    SlotArray("pos", "<i8", _one),  # next write index in the ring
    SlotArray("last_seen", "<f8", _one),
    SlotArray("dirty", "?", _one),
    SlotArray("partition", "<i4", _one, fresh=-1),
)


@dataclass(frozen=True)
class ScoreStats:
    """A view (the store's own arrays, not copies) of the per-entity score statistics a threshold reads and
    updates: Welford n, mean and m2 of the normal log1p-scores, and the smoothed log-score. Take it after the
    batch's entities are resolved: resolving can grow (replace) the arrays."""

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    ema: np.ndarray


Loader = Callable[[Sequence[str]], dict[str, bytes]]


class EntityStateStore:
    """Slots for live entities; `resolve` maps ids to slots, creating (or loading) the missing ones."""

    # the arrays of SLOT_ARRAYS (allocated from it; named here for the type checker), one row per slot
    count: np.ndarray
    last_ts: np.ndarray
    win: np.ndarray
    feat_n: np.ndarray
    feat_mean: np.ndarray
    feat_m2: np.ndarray
    score_n: np.ndarray
    score_mean: np.ndarray
    score_m2: np.ndarray
    score_ema: np.ndarray
    rnn_h: np.ndarray
    rnn_c: np.ndarray
    rnn_pred: np.ndarray
    pos: np.ndarray
    last_seen: np.ndarray
    dirty: np.ndarray
    partition: np.ndarray

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
        f = layout.n_features
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
        for a in SLOT_ARRAYS:
            setattr(self, a.name, np.full((cap, *a.dims(layout)), a.fresh, a.dtype))

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
        for a in SLOT_ARRAYS:
            old = getattr(self, a.name)
            arr = np.full((new, *old.shape[1:]), a.fresh, old.dtype)
            arr[:cap] = old
            setattr(self, a.name, arr)

    def savepoint(self, slots: np.ndarray) -> Callable[[], None]:
        """Undo for a batch about to be applied to `slots` (resolved, batch order): the slots' per-slot values
        and the window rows the batch's pushes can overwrite (an entity's k-th event writes ring row pos + k; an
        entity with no event yet refills its whole window, so new entities' windows are saved whole)."""
        ring = (self.pos[slots] + occurrence_rank(slots)) % self.layout.window
        rows = self.win[slots, ring]
        fresh = slots[self.count[slots] == 0]
        fresh_win = self.win[fresh]
        saved = [(a.name, getattr(self, a.name)[slots]) for a in SLOT_ARRAYS if a.name != RING]

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
        for a in SLOT_ARRAYS:
            getattr(self, a.name)[slot] = a.fresh

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

    def score_stats(self) -> ScoreStats:
        return ScoreStats(self.score_n, self.score_mean, self.score_m2, self.score_ema)

    # -- snapshots -----------------------------------------------------------------------------------
    def snapshot(self, slots: np.ndarray) -> list[bytes]:
        """Fixed-size blobs for `slots` (one structured record each)."""
        layout = self.layout
        rec = np.zeros(len(slots), layout.dtype)
        rec["version"] = LAYOUT_VERSION
        rec["window"] = layout.window
        rec["n_features"] = layout.n_features
        for a in SLOT_ARRAYS:
            if a.persisted_in(layout, LAYOUT_VERSION):
                rec[a.name] = self.windows(slots) if a.name == RING else getattr(self, a.name)[slots]
        buf = rec.tobytes()
        size = layout.blob_size
        return [buf[i * size : (i + 1) * size] for i in range(len(slots))]

    def _restore_slot(self, slot: int, blob: bytes, entity_id: str) -> None:
        """Into a fresh slot: arrays the blob's version lacks keep their fresh values, the ring starts at 0."""
        layout = self.layout
        version = int(np.frombuffer(blob[:2], "<u2")[0]) if len(blob) >= 2 else -1
        if version not in (1, LAYOUT_VERSION) or len(blob) != layout.dtype_of(version).itemsize:
            raise StateError(
                f"state of {entity_id!r}: {len(blob)} bytes of layout v{version}; this model needs "
                f"v{LAYOUT_VERSION} with {layout.blob_size} bytes (window={layout.window} "
                f"features={layout.n_features}). Migrate or start a new run_id."
            )
        rec = np.frombuffer(blob, layout.dtype_of(version))[0]
        if (int(rec["window"]), int(rec["n_features"])) != (layout.window, layout.n_features):
            raise StateError(
                f"state of {entity_id!r} was saved with layout v{rec['version']} window={rec['window']} "
                f"features={rec['n_features']}; this model needs window={layout.window} "
                f"features={layout.n_features}. Migrate or start a new run_id."
            )
        for a in SLOT_ARRAYS:
            if a.persisted_in(layout, version):
                getattr(self, a.name)[slot] = rec[a.name]
        self.last_seen[slot] = rec["last_ts"]

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
        return sum(getattr(self, a.name).nbytes for a in SLOT_ARRAYS) / max(1, self.capacity)
