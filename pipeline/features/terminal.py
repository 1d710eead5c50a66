"""Per-terminal context for a customer-keyed payment stream.

A worker only sees its own partitions (keyed by customer), so this state is partition-local: it
summarises the terminal's traffic *as seen by this worker*, which is deterministic given the partitioning
(and exact with one worker, as in `pipeline evaluate`). Pure numpy, no IO. Per terminal it keeps an
exponentially decayed transaction count and decayed mean log-amount (time constant `tau_s`); each event
is featurised from the state *before* it, then folded in, in event order (rounds keep batches exact).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TERMINAL_FEATURES = ["terminal_log_rate", "terminal_amount_dev"]


class TerminalContext:
    def __init__(self, tau_s: float = 86400.0, prior_log_amount: float = 3.5) -> None:
        self.tau_s = float(tau_s)
        self.prior = float(prior_log_amount)
        self._slot: dict[str, int] = {}
        self.n = np.zeros(0)
        self.s = np.zeros(0)
        self.last = np.zeros(0)

    def __len__(self) -> int:
        return len(self._slot)

    def _slots(self, terminal_ids: Sequence[str]) -> np.ndarray:
        for t in terminal_ids:
            if t not in self._slot:
                self._slot[t] = len(self._slot)
        need = len(self._slot)
        if need > len(self.n):
            grow = max(need, 2 * len(self.n), 64) - len(self.n)
            self.n = np.r_[self.n, np.zeros(grow)]
            self.s = np.r_[self.s, np.zeros(grow)]
            self.last = np.r_[self.last, np.full(grow, np.nan)]
        return np.fromiter((self._slot[t] for t in terminal_ids), np.int64, len(terminal_ids))

    def features(self, terminal_ids: Sequence[str], ts: np.ndarray, log_amount: np.ndarray) -> np.ndarray:
        """(N, 2): log1p(decayed count of the terminal's earlier payments), log-amount minus its decayed mean."""
        from pipeline.scoring.scorer import occurrence_rank, rounds  # numpy helpers; no IO

        slots = self._slots(terminal_ids)
        out = np.empty((len(ts), 2), np.float64)
        for idx in rounds(occurrence_rank(slots)):
            s, t = slots[idx], ts[idx]
            decay = np.where(np.isnan(self.last[s]), 0.0, np.exp(-np.clip(t - self.last[s], 0, None) / self.tau_s))
            n, tot = self.n[s] * decay, self.s[s] * decay
            mean = (tot + self.prior) / (n + 1.0)  # one pseudo-payment at the prior keeps new terminals sane
            out[idx, 0] = np.log1p(n)
            out[idx, 1] = log_amount[idx] - mean
            self.n[s], self.s[s], self.last[s] = n + 1.0, tot + log_amount[idx], t
        return out
