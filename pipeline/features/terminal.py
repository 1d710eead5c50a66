"""Per-terminal context for a customer-keyed payment stream.

A worker only sees its own partitions (keyed by customer), so this state is partition-local: it
summarises the terminal's traffic *as seen by this worker*, which is deterministic given the partitioning
(and exact with one worker, as in `pipeline evaluate`). Pure numpy, no IO. Per terminal it keeps an
exponentially decayed transaction count and decayed mean log-amount (time constant `tau_s`); each event
is featurised from the state *before* it, then folded in, in event order (rounds keep batches exact).

Optionally (`feedback_tau_s`) it also keeps the terminal's confirmed-fraud rate from *label feedback*
(chargebacks, analysts' labels): `feedback()` folds in labels when they become known, and the feature is
the decayed share of fraud among the terminal's labelled payments. Labels arrive late (days), so the
feature only ever uses what was known at the event's time; a compromised terminal raises the risk of
every later payment there, which no label-free feature of the payment itself can show.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TERMINAL_FEATURES = ["terminal_log_rate", "terminal_amount_dev"]
FEEDBACK_FEATURES = ["terminal_fraud_risk"]


def _decay(last: np.ndarray, t: np.ndarray, tau_s: float) -> np.ndarray:
    """exp(-(t - last) / tau); 0 where nothing was seen yet (last is NaN), so the sums start empty."""
    return np.where(np.isnan(last), 0.0, np.exp(-np.clip(t - last, 0, None) / tau_s))


class TerminalContext:
    def __init__(self, tau_s: float = 86400.0, prior_log_amount: float = 3.5, *,
                 feedback_tau_s: float | None = None, feedback_prior: float = 1.0) -> None:
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

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def n_features(self) -> int:
        return len(TERMINAL_FEATURES) + (len(FEEDBACK_FEATURES) if self.feedback_tau_s is not None else 0)

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
            self.fb_fraud = np.r_[self.fb_fraud, np.zeros(grow)]
            self.fb_n = np.r_[self.fb_n, np.zeros(grow)]
            self.fb_last = np.r_[self.fb_last, np.full(grow, np.nan)]
        return np.fromiter((self._slot[t] for t in terminal_ids), np.int64, len(terminal_ids))

    def features(self, terminal_ids: Sequence[str], ts: np.ndarray, log_amount: np.ndarray) -> np.ndarray:
        """(N, n_features): log1p(decayed count of the terminal's earlier payments), log-amount minus its
        decayed mean, and (with feedback) the decayed fraud share of its labelled payments known so far."""
        from pipeline.scoring.scorer import occurrence_rank, rounds  # numpy helpers; no IO

        slots = self._slots(terminal_ids)
        out = np.empty((len(ts), self.n_features), np.float64)
        for idx in rounds(occurrence_rank(slots)):
            s, t = slots[idx], ts[idx]
            decay = _decay(self.last[s], t, self.tau_s)
            n, tot = self.n[s] * decay, self.s[s] * decay
            mean = (tot + self.prior) / (n + 1.0)  # one pseudo-payment at the prior keeps new terminals sane
            out[idx, 0] = np.log1p(n)
            out[idx, 1] = log_amount[idx] - mean
            self.n[s], self.s[s], self.last[s] = n + 1.0, tot + log_amount[idx], t
        if self.feedback_tau_s is not None:
            d = _decay(self.fb_last[slots], ts, self.feedback_tau_s)
            out[:, 2] = self.fb_fraud[slots] * d / (self.fb_n[slots] * d + self.feedback_prior)
        return out

    def feedback(self, terminal_ids: Sequence[str], known_at: np.ndarray, is_fraud: np.ndarray) -> None:
        """Fold in labels of earlier payments, known at `known_at` (event time, non-decreasing per terminal)."""
        if self.feedback_tau_s is None:
            raise ValueError("this TerminalContext was built without feedback_tau_s")
        from pipeline.scoring.scorer import occurrence_rank, rounds

        slots = self._slots(terminal_ids)
        fraud = np.asarray(is_fraud, np.float64)
        for idx in rounds(occurrence_rank(slots)):
            s, t = slots[idx], known_at[idx]
            d = _decay(self.fb_last[s], t, self.feedback_tau_s)
            self.fb_fraud[s] = self.fb_fraud[s] * d + fraud[idx]
            self.fb_n[s] = self.fb_n[s] * d + 1.0
            self.fb_last[s] = np.where(np.isnan(self.fb_last[s]), t, np.maximum(self.fb_last[s], t))
