"""Per-terminal context for a customer-keyed payment stream.

State is per *partition* (one `TerminalContext` per partition of the customer-keyed topic): it summarises
the terminal's traffic as seen in that partition, so it is deterministic whichever worker owns the
partition, it moves with the partition on a rebalance, and it is snapshotted with the partition's entity
states (exact with one partition, as in `pipeline evaluate`). Pure numpy, no IO. Per terminal it keeps an
exponentially decayed transaction count and decayed mean log-amount (time constant `tau_s`); each event
is featurised from the state *before* it, then folded in, in event order (rounds keep batches exact).

Optionally (`feedback_tau_s`) it also keeps the terminal's confirmed-fraud rate from *label feedback*
(chargebacks, analysts' labels): the decayed share of fraud among the terminal's labelled payments.
Labels arrive late (days) and are queued (`add_labels`, in the order they were read); a queued label is
folded in just before the first payment whose time is at or after the label's `known_at`, so a payment
never sees a label that was not yet known at its own time. Labels are applied in queue order (a label
that is not due yet holds back the ones behind it), which keeps "applied up to offset X" a single number
the processor can commit. A compromised terminal raises the risk of every later payment there, which no
label-free feature of the payment itself can show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import orjson

from pipeline.state.rounds import occurrence_rank, rounds

TERMINAL_FEATURES = ["terminal_log_rate", "terminal_amount_dev"]
FEEDBACK_FEATURES = ["terminal_fraud_risk"]
_SNAPSHOT_VERSION = 1


def _decay(last: np.ndarray, t: np.ndarray, tau_s: float) -> np.ndarray:
    """exp(-(t - last) / tau); 0 where nothing was seen yet (last is NaN), so the sums start empty."""
    return np.where(np.isnan(last), 0.0, np.exp(-np.clip(t - last, 0, None) / tau_s))


class TerminalContext:
    ARRAYS = ("n", "s", "last", "fb_fraud", "fb_n", "fb_last")
    IDLE_TAUS = 30.0  # a terminal idle this many time constants is forgotten: its decayed sums are < e^-30

    def __init__(
        self,
        tau_s: float = 86400.0,
        prior_log_amount: float = 3.5,
        *,
        feedback_tau_s: float | None = None,
        feedback_prior: float = 1.0,
    ) -> None:
        self.tau_s = float(tau_s)
        self.prior = float(prior_log_amount)
        self.feedback_tau_s = None if feedback_tau_s is None else float(feedback_tau_s)
        self.feedback_prior = float(feedback_prior)  # pseudo-count of legitimate labels: one fraud != 100 %
        self._slot: dict[str, int] = {}
        self.n = np.zeros(0)
        self.s = np.zeros(0)
        self.last = np.zeros(0)
        self.fb_fraud = np.zeros(0)  # decayed count of labels saying fraud
        self.fb_n = np.zeros(0)  # decayed count of labels
        self.fb_last = np.zeros(0)  # time the decayed counts refer to
        # labels read but not yet due, in read order (not part of a snapshot: they are re-read from the log)
        self._q_offset = np.zeros(0, np.int64)
        self._q_known = np.zeros(0)
        self._q_fraud = np.zeros(0)
        self._q_terminal: list[str] = []
        self._swept_at = float("-inf")  # event time of the last sweep of idle terminals

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def slots(self) -> dict[str, int]:
        """Terminal id -> its index in the per-terminal arrays (ARRAYS); read-only."""
        return self._slot

    @property
    def n_features(self) -> int:
        return len(TERMINAL_FEATURES) + (len(FEEDBACK_FEATURES) if self.feedback_tau_s is not None else 0)

    @property
    def pending_labels(self) -> int:
        return len(self._q_terminal)

    @property
    def first_pending_offset(self) -> int | None:
        """Log offset of the oldest queued label: every label read before it has been applied."""
        return int(self._q_offset[0]) if len(self._q_offset) else None

    def _slots(self, terminal_ids: Sequence[str]) -> np.ndarray:
        for t in terminal_ids:
            if t not in self._slot:
                self._slot[t] = len(self._slot)
        need = len(self._slot)
        if need > len(self.n):
            grow = max(need, 2 * len(self.n), 64) - len(self.n)
            for name in self.ARRAYS:
                fill = np.nan if name in ("last", "fb_last") else 0.0
                setattr(self, name, np.r_[getattr(self, name), np.full(grow, fill)])
        return np.fromiter((self._slot[t] for t in terminal_ids), np.int64, len(terminal_ids))

    def add_labels(
        self,
        offsets: Sequence[int] | np.ndarray,
        terminal_ids: Sequence[str],
        known_at: np.ndarray,
        is_fraud: np.ndarray,
    ) -> None:
        """Queue labels (in log order); each is applied by `features` once payments reach its `known_at`."""
        if self.feedback_tau_s is None:
            raise ValueError("this TerminalContext was built without feedback_tau_s")
        self._q_offset = np.r_[self._q_offset, np.asarray(offsets, np.int64)]
        self._q_known = np.r_[self._q_known, np.asarray(known_at, np.float64)]
        self._q_fraud = np.r_[self._q_fraud, np.asarray(is_fraud, np.float64)]
        self._q_terminal.extend(terminal_ids)

    def features(
        self, terminal_ids: Sequence[str], ts: np.ndarray, log_amount: np.ndarray, frozen: np.ndarray | None = None
    ) -> np.ndarray:
        """(N, n_features): log1p(decayed count of the terminal's earlier payments), log-amount minus its
        decayed mean, and (with feedback) the decayed fraud share of its labelled payments known so far.
        frozen (N,) bool: payments featurised from the context without being folded into it (late events,
        which leave their customer's state untouched too)."""
        slots = self._slots(terminal_ids)
        out = np.empty((len(ts), self.n_features), np.float64)
        for idx in rounds(occurrence_rank(slots)):
            s, t = slots[idx], ts[idx]
            decay = _decay(self.last[s], t, self.tau_s)
            n, tot = self.n[s] * decay, self.s[s] * decay
            mean = (tot + self.prior) / (n + 1.0)  # one pseudo-payment at the prior keeps new terminals sane
            out[idx, 0] = np.log1p(n)
            out[idx, 1] = log_amount[idx] - mean
            if frozen is None:
                self.n[s], self.s[s], self.last[s] = n + 1.0, tot + log_amount[idx], t
            else:
                k = ~frozen[idx]
                sk = s[k]
                self.n[sk], self.s[sk], self.last[sk] = n[k] + 1.0, tot[k] + log_amount[idx][k], t[k]
        if self.feedback_tau_s is not None:
            out[:, 2] = self._risk_with_due_labels(slots, np.asarray(ts, np.float64))
        if len(ts):
            self._sweep(float(np.max(ts)))
        return out

    @property
    def idle_s(self) -> float:
        return self.IDLE_TAUS * max(self.tau_s, self.feedback_tau_s or 0.0)

    def _sweep(self, now: float) -> None:
        """Forget terminals idle for `idle_s` (event time), so memory and snapshots follow the terminals that
        are active, not all ever seen. What is forgotten is below e^-30 of its value, so a returning terminal
        gets the same features to ~1e-13 as if it had been kept. Runs every idle_s / 4 of event time."""
        if now - self._swept_at < self.idle_s / 4:
            return
        self._swept_at = now
        k = len(self._slot)
        if not k:
            return
        seen = np.fmax(self.last[:k], self.fb_last[:k])  # NaN only where neither was ever set
        keep = ~(seen < now - self.idle_s)
        if keep.all():
            return
        ids = [t for t, i in self._slot.items() if keep[i]]  # insertion order == slot order
        for name in self.ARRAYS:
            setattr(self, name, getattr(self, name)[:k][keep].copy())
        self._slot = {t: i for i, t in enumerate(ids)}

    def _risk_with_due_labels(self, slots: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Fraud share per payment, folding in each due label just before the first payment (in batch order)
        whose time reaches the label's known_at. Labels and payments are merged into one sequence and run in
        per-terminal rounds, so a batch costs a few vectorised steps however many labels fall inside it."""
        tau = self.feedback_tau_s
        if tau is None:
            raise ValueError("this TerminalContext was built without feedback_tau_s")
        n = len(ts)
        due = 0
        if len(self._q_known) and n:
            before_row = np.searchsorted(np.maximum.accumulate(ts), self._q_known, side="left")
            before_row = np.maximum.accumulate(before_row)  # queue order: a label waits for the ones ahead
            due = int(np.searchsorted(before_row, n, side="left"))
        if due == 0:
            d = _decay(self.fb_last[slots], ts, tau)
            return np.asarray(self.fb_fraud[slots] * d / (self.fb_n[slots] * d + self.feedback_prior))
        lab_slots = self._slots(self._q_terminal[:due])
        order = np.argsort(np.r_[2 * before_row[:due], 2 * np.arange(n) + 1], kind="stable")
        m_slot = np.r_[lab_slots, slots][order]
        m_time = np.r_[self._q_known[:due], ts][order]
        m_fraud = np.r_[self._q_fraud[:due], np.zeros(n)][order]
        m_row = np.r_[np.full(due, -1, np.int64), np.arange(n)][order]
        risk = np.empty(n, np.float64)
        for idx in rounds(occurrence_rank(m_slot)):
            is_row = m_row[idx] >= 0
            q, u = idx[is_row], idx[~is_row]
            if len(q):
                s = m_slot[q]
                d = _decay(self.fb_last[s], m_time[q], tau)
                risk[m_row[q]] = self.fb_fraud[s] * d / (self.fb_n[s] * d + self.feedback_prior)
            if len(u):
                self._fold(m_slot[u], m_time[u], m_fraud[u])
        self._q_offset, self._q_known, self._q_fraud = self._q_offset[due:], self._q_known[due:], self._q_fraud[due:]
        del self._q_terminal[:due]
        return risk

    def _fold(self, s: np.ndarray, t: np.ndarray, fraud: np.ndarray) -> None:
        """Fold one label per distinct terminal slot into the decayed counts."""
        tau = self.feedback_tau_s
        if tau is None:
            raise ValueError("this TerminalContext was built without feedback_tau_s")
        d = _decay(self.fb_last[s], t, tau)
        self.fb_fraud[s] = self.fb_fraud[s] * d + fraud
        self.fb_n[s] = self.fb_n[s] * d + 1.0
        self.fb_last[s] = np.where(np.isnan(self.fb_last[s]), t, np.maximum(self.fb_last[s], t))

    def savepoint(self) -> Callable[[], None]:
        """Undo for a batch about to be featurised: the per-terminal state, the terminals known and the label
        queue as they are now (the processor undoes a batch to retry or re-run it)."""
        arrays = [(name, getattr(self, name).copy()) for name in self.ARRAYS]
        slot, swept = dict(self._slot), self._swept_at
        queue = (self._q_offset, self._q_known, self._q_fraud, list(self._q_terminal))  # arrays: replaced, not mutated

        def restore() -> None:
            for name, values in arrays:
                setattr(self, name, values.copy())
            self._slot, self._swept_at = dict(slot), swept
            self._q_offset, self._q_known, self._q_fraud = queue[:3]
            self._q_terminal = list(queue[3])

        return restore

    # -- snapshots ----------------------------------------------------------------------------------
    def params(self) -> dict[str, float | None]:
        return {
            "tau_s": self.tau_s,
            "prior": self.prior,
            "feedback_tau_s": self.feedback_tau_s,
            "feedback_prior": self.feedback_prior,
        }

    def snapshot(self) -> bytes:
        """The per-terminal state (not the label queue): JSON header line, terminal ids, float64 arrays."""
        k = len(self._slot)
        header = orjson.dumps({"v": _SNAPSHOT_VERSION, "terminals": k, **self.params()})
        ids = "\n".join(self._slot).encode()  # insertion order == slot order; ids never contain newlines
        arrays = np.stack([getattr(self, a)[:k] for a in self.ARRAYS]).astype("<f8").tobytes()
        return b"%s\n%d\n%s%s" % (header, len(ids), ids, arrays)

    @classmethod
    def restore(cls, blob: bytes) -> TerminalContext:
        """Inverse of `snapshot`; ValueError on a blob this version cannot read."""
        try:
            head, size, rest = blob.split(b"\n", 2)
            meta = orjson.loads(head)
            n_ids = int(size)
        except (ValueError, orjson.JSONDecodeError) as exc:
            raise ValueError(f"not a terminal-context snapshot: {exc}") from None
        if meta.get("v") != _SNAPSHOT_VERSION:
            raise ValueError(
                f"terminal-context snapshot version {meta.get('v')!r} (this build reads {_SNAPSHOT_VERSION})"
            )
        ctx = cls(
            meta["tau_s"], meta["prior"], feedback_tau_s=meta["feedback_tau_s"], feedback_prior=meta["feedback_prior"]
        )
        k = int(meta["terminals"])
        ids = rest[:n_ids].decode().split("\n") if k else []
        arrays = np.frombuffer(rest[n_ids:], "<f8")
        if len(ids) != k or arrays.size != len(cls.ARRAYS) * k:
            raise ValueError(
                f"terminal-context snapshot is truncated ({len(ids)} ids, {arrays.size} values, "
                f"expected {k} and {len(cls.ARRAYS) * k})"
            )
        ctx._slots(ids)
        for i, name in enumerate(cls.ARRAYS):
            getattr(ctx, name)[:k] = arrays[i * k : (i + 1) * k]
        return ctx

    def same_parameters(self, other: TerminalContext) -> bool:
        return self.params() == other.params()
