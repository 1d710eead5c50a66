"""Struct-of-arrays entity state, so a whole micro-batch updates in a few numpy calls.

Each entity owns a slot: a ring buffer of its last W raw feature vectors, Welford statistics of its
features (shrunk towards the model's global statistics while young) and of its normal log-scores.
Snapshots are fixed-size byte blobs (one numpy structured record) so they can be persisted and restored
exactly. A record names the model that wrote it: one written by another model (a promoted version took over)
keeps what carries over to this one (CarryOver); bytes that are no state record raise StateError.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pipeline.errors import StateError
from pipeline.state.rounds import occurrence_rank

LAYOUT_VERSION = 4  # see SLOT_ARRAYS; v3 added the writer's model and features to the header, v4 `alerting`
Field = tuple[str, str] | tuple[str, str, tuple[int, ...]]


def identity(text: str) -> int:
    """The 32-bit name a record header gives a model version or a feature list (0: unnamed)."""
    return (zlib.crc32(text.encode()) or 1) if text else 0


def _header(version: int) -> list[Field]:
    head: list[Field] = [("version", "<u2"), ("window", "<u2"), ("n_features", "<u2")]
    return head + [("model", "<u4"), ("features", "<u4")] if version >= 3 else head


@dataclass(frozen=True)
class StateLayout:
    window: int
    n_features: int
    # floats of a stateful model's h (and of c) per entity (models.lstm_forecast); 0 = none. When > 0 the
    # record also holds h, c and the entity's last prediction of its next (scaled) reading
    recurrent: int = 0
    # who writes the records: `identity` of the model version and of its feature names (0: unnamed, e.g. a
    # training scorer). A record of another model is recognized at restore (CarryOver)
    model: int = 0
    features: int = 0

    @classmethod
    def of_model(cls, window: int, feature_names: Sequence[str], recurrent: int, version: str) -> StateLayout:
        return cls(window, len(feature_names), recurrent, identity(version), identity("\x1f".join(feature_names)))

    def dtype_of(self, version: int) -> np.dtype:
        fields = _header(version)
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
    """One per-entity array of EntityStateStore: its dtype, per-slot shape and the value of an empty slot,
    whether (since which layout version) the snapshot record holds it, and what a change of model keeps."""

    name: str
    dtype: str
    dims: Callable[[StateLayout], tuple[int, ...]]
    carry: str  # ENTITY | STATS | SCORES | WINDOW | OWN, see CarryOver
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
# What of an entity's state another model keeps (SlotArray.carry; CarryOver decides):
ENTITY = "entity"  # facts of the entity's events, whatever model scores them: always
STATS = "stats"  # feature scaling statistics: when the features are the same
# score statistics (and the alert state) describe one model's scores: only that model's. Another version's
# scores have another scale, so thresholds learnt from them would judge the new model wrongly (a hot
# promote raised false alerts that neither version raised alone)
SCORES = "scores"
WINDOW = "window"  # the autoencoder's input window (and its fill count): same features and window length
OWN = "own"  # a stateful model's (h, c) and prediction: never (a new model's (h, c) are not the old one's)

# The per-entity state layout, written once: it drives allocation, growth, slot reset, the undo savepoint,
# byte accounting and the snapshot record (persisted arrays, in record order). v2 added score_ema (the
# entity's smoothed score); v1 blobs are migrated on load (smoothing restarts). v3 names the writing model in the
# header: a record of another model keeps what its arrays' `carry` allows. v4 added `alerting` (older records
# load with it off).
SLOT_ARRAYS = (
    SlotArray("count", "<i8", _one, WINDOW, persisted_since=1),
    SlotArray("last_ts", "<f8", _one, ENTITY, fresh=np.nan, persisted_since=1),
    SlotArray(RING, "<f4", lambda layout: (layout.window, layout.n_features), WINDOW, persisted_since=1),
    SlotArray("feat_n", "<f8", _one, STATS, persisted_since=1),
    SlotArray("feat_mean", "<f8", _features, STATS, persisted_since=1),
    SlotArray("feat_m2", "<f8", _features, STATS, persisted_since=1),
    SlotArray("score_n", "<f8", _one, SCORES, persisted_since=1),
    SlotArray("score_mean", "<f8", _one, SCORES, persisted_since=1),
    SlotArray("score_m2", "<f8", _one, SCORES, persisted_since=1),
    # EWMA of log1p(score); NaN until scored
    SlotArray("score_ema", "<f8", _one, SCORES, fresh=np.nan, persisted_since=2),
    # the entity's last judged event alerted (the threshold's hysteresis, ThresholdKnobs.z_release)
    SlotArray("alerting", "?", _one, SCORES, fresh=False, persisted_since=4),
    SlotArray("rnn_h", "<f4", _recurrent, OWN, persisted_since=1, recurrent=True),
    SlotArray("rnn_c", "<f4", _recurrent, OWN, persisted_since=1, recurrent=True),
    # NaN: no step yet
    SlotArray("rnn_pred", "<f4", _prediction, OWN, fresh=np.nan, persisted_since=1, recurrent=True),
    SlotArray("pos", "<i8", _one, WINDOW),  # next write index in the ring
    SlotArray("last_seen", "<f8", _one, ENTITY),
    SlotArray("dirty", "?", _one, ENTITY),
    SlotArray("partition", "<i4", _one, ENTITY, fresh=-1),
)


@dataclass(frozen=True)
class CarryOver:
    """What of an entity's state saved under layout `old` the model of layout `new` keeps (SlotArray.carry).
    Another model always re-learns the entity's score statistics (judging it by its own global threshold
    until they are back); where the features are the same it keeps the feature scaling; where only the window
    or (h, c) go, it refills them (min_history events before any alert)."""

    same_model: bool
    stats: bool
    window: bool

    @classmethod
    def between(cls, old: StateLayout, new: StateLayout) -> CarryOver:
        dims = (old.window, old.n_features, old.recurrent) == (new.window, new.n_features, new.recurrent)
        # an unnamed record (layout v1/v2) whose dimensions fit is taken as this model's, as before v3
        same = dims and (old.model == 0 or (old.model, old.features) == (new.model, new.features))
        unnamed = 0 in (old.features, new.features)
        stats = old.n_features == new.n_features and (unnamed or old.features == new.features)
        window = stats and old.window == new.window and old.recurrent == 0 == new.recurrent
        return cls(same, stats, window)

    def keeps(self, array: SlotArray) -> bool:
        kept = {ENTITY: True, STATS: self.stats, SCORES: False, WINDOW: self.window, OWN: False}
        return self.same_model or kept[array.carry]

    def describe(self) -> str:
        if self.same_model:
            return "everything kept"
        if not self.stats:
            return "features differ: re-warming on the global threshold"
        return "scaling kept, score statistics re-learnt on the new model's threshold; " + (
            "window kept" if self.window else "window and recurrent state re-warm"
        )


@dataclass(frozen=True)
class ScoreStats:
    """A view (the store's own arrays, not copies) of the per-entity score statistics a threshold reads and
    updates: Welford n, mean and m2 of the normal log1p-scores, the smoothed log-score and whether the last
    judged event alerted. Take it after the batch's entities are resolved: resolving can grow (replace) the
    arrays."""

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    ema: np.ndarray
    alerting: np.ndarray


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
    alerting: np.ndarray
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
        self._slot_of: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        self.carried_over = 0  # entities resumed from another model's record: only what carries over was kept
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

    def restart_context(self, slots: np.ndarray) -> None:
        """Forget the entities' sequence context (window, fill count, a stateful model's (h, c) and prediction)
        but keep their scaling and score statistics: after a gap in the stream (a restarted machine, a new
        recording) the next reading does not follow the last one, so the model must not read it as if it did.
        The entities refill their context (min_history events without alerts), not their thresholds."""
        for a in SLOT_ARRAYS:
            if a.carry in (WINDOW, OWN):
                getattr(self, a.name)[slots] = a.fresh
        self.dirty[slots] = True

    def unknown(self, entity_ids: Sequence[str]) -> list[str]:
        """Distinct ids without a live slot (first seen since assignment or eviction), in batch order."""
        slot_of = self._slot_of
        return list(dict.fromkeys(e for e in entity_ids if e not in slot_of))

    def admit(self, blobs: Mapping[str, bytes]) -> None:
        """Entities not live yet resume from their saved states (the caller read them from the last checkpoint)."""
        for eid, blob in blobs.items():
            if eid not in self._slot_of and not self._restore_slot(self._new_slot(eid), blob, eid):
                self.carried_over += 1

    def adopt(self, old: EntityStateStore) -> CarryOver:
        """Take over the live entities of `old`, the store of the model this one replaces, with what carries over
        to this model; all dirty, so the next snapshot writes them under this layout."""
        carry = CarryOver.between(old.layout, self.layout)
        src = np.fromiter((s for e, s in old._slot_of.items() if e not in self._slot_of), np.int64)
        ids = old.entity_ids(src)
        first = len(self._ids)  # one block of new slots, not slot by slot (100k entities: ~0.7 s, mostly windows)
        self._grow(first + len(ids))
        dst = np.arange(first, first + len(ids), dtype=np.int64)
        self._ids.extend(ids)
        self._slot_of.update(zip(ids, dst.tolist(), strict=True))
        for a in SLOT_ARRAYS:
            getattr(self, a.name)[dst] = getattr(old, a.name)[src] if carry.keeps(a) else a.fresh
        self.dirty[dst] = True
        return carry

    def resolve(self, entity_ids: Sequence[str], partitions: np.ndarray | None = None) -> np.ndarray:
        """Slots for `entity_ids` (batch order); ids without one start fresh (saved states come in by `admit`)."""
        slot_of = self._slot_of
        for eid in self.unknown(entity_ids):
            self._new_slot(eid)
        slots = np.fromiter((slot_of[e] for e in entity_ids), dtype=np.int64, count=len(entity_ids))
        if partitions is not None:
            self.partition[slots] = partitions
        return slots

    def entity_ids(self, slots: Iterable[int]) -> list[str]:
        return [self._ids[s] or "" for s in slots]

    def live(self) -> dict[str, int]:
        """entity id -> slot of every live entity (a copy: for inspection, tests and tools)."""
        return dict(self._slot_of)

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
        return ScoreStats(self.score_n, self.score_mean, self.score_m2, self.score_ema, self.alerting)

    # -- snapshots -----------------------------------------------------------------------------------
    def snapshot(self, slots: np.ndarray) -> list[bytes]:
        """Fixed-size blobs for `slots` (one structured record each)."""
        layout = self.layout
        rec = np.zeros(len(slots), layout.dtype)
        rec["version"] = LAYOUT_VERSION
        rec["window"] = layout.window
        rec["n_features"] = layout.n_features
        rec["model"] = layout.model
        rec["features"] = layout.features
        for a in SLOT_ARRAYS:
            if a.persisted_in(layout, LAYOUT_VERSION):
                rec[a.name] = self.windows(slots) if a.name == RING else getattr(self, a.name)[slots]
        buf = rec.tobytes()
        size = layout.blob_size
        return [buf[i * size : (i + 1) * size] for i in range(len(slots))]

    def _restore_slot(self, slot: int, blob: bytes, entity_id: str) -> bool:
        """Into a fresh slot: arrays the blob's version lacks keep their fresh values, the ring starts at 0. A
        record of another model keeps what carries over (CarryOver); then False."""
        version, saved = saved_layout(blob, entity_id)
        carry = CarryOver.between(saved, self.layout)
        rec = np.frombuffer(blob, saved.dtype_of(version))[0]
        for a in SLOT_ARRAYS:
            if a.persisted_in(saved, version) and carry.keeps(a):
                getattr(self, a.name)[slot] = rec[a.name]
        self.last_seen[slot] = rec["last_ts"]
        return carry.same_model

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


def saved_layout(blob: bytes, entity_id: str) -> tuple[int, StateLayout]:
    """The layout version and layout a state record was written with: its header, and its size for a stateful
    model's arrays (h, c: `recurrent` floats each). StateError for bytes that are no state record."""
    version = int(np.frombuffer(blob[:2], "<u2")[0]) if len(blob) >= 2 else -1
    head = np.dtype(_header(version))
    if version in range(1, LAYOUT_VERSION + 1) and len(blob) >= head.itemsize:
        h = np.frombuffer(blob, head, count=1)[0]
        names = (int(h["model"]), int(h["features"])) if version >= 3 else (0, 0)
        plain = StateLayout(int(h["window"]), int(h["n_features"]), 0, *names)
        size = [replace(plain, recurrent=r).dtype_of(version).itemsize for r in (0, 1, 2)]
        per_unit = size[2] - size[1]
        extra = len(blob) - size[0] - (size[1] - size[0] - per_unit)  # the bytes of h and c
        layout = replace(plain, recurrent=max(0, extra // per_unit)) if len(blob) > size[0] else plain
        if layout.dtype_of(version).itemsize == len(blob):
            return version, layout
    raise StateError(
        f"state of {entity_id!r}: {len(blob)} bytes are no entity state record (layout v1-v{LAYOUT_VERSION})"
    )
