"""Live drift of each stream's champion against its model card, as Prometheus gauges and for the alerts page:
the PSI of the recent scores over the card's score quantiles (pipeline_score_psi), the share of live entities
still warming up (pipeline_warming_share) and, where the card holds channel_stats (cards written by
`pipeline train --stream`), each channel's input PSI (pipeline_input_psi).

The figures are pipeline.registry.drift's, the ones `pipeline models drift` prints. Each stream keeps its last
`window` scores of warm entities and inputs in fixed rings, appended per batch with a few numpy copies; the
figures are recomputed at most every `refresh_s` seconds. A new champion version (a swap) starts its stream's
window over, against the new card.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import metrics
from pipeline.registry import drift
from pipeline.scoring.scorer import ScoreBatch, StreamScorer

log = logging.getLogger(__name__)
WINDOW = 10_000  # recent values per stream (and per channel) the figures are computed over
MIN_VALUES = 100  # fewer recent values than this: no figure yet


class Ring:
    """The last `size` rows appended (rows of `width` values), oldest overwritten first."""

    def __init__(self, size: int, width: int) -> None:
        self.values = np.zeros((size, width), np.float64)
        self.next = 0
        self.filled = 0

    def extend(self, rows: np.ndarray) -> None:
        size = len(self.values)
        rows = rows[-size:]
        at = (self.next + np.arange(len(rows))) % size
        self.values[at] = rows
        self.next = (self.next + len(rows)) % size
        self.filled = min(size, self.filled + len(rows))

    def column(self, j: int) -> np.ndarray:
        return self.values[: self.filled, j]


@dataclass
class StreamWindow:
    """One stream's recent values under one champion version, and the card references they are judged by."""

    version: str
    score_quantiles: tuple[np.ndarray, np.ndarray] | None  # None: the card has no score quantiles
    channels: dict[str, int]  # channel with card statistics -> its feature column
    channel_stats: dict[str, Any]
    scores: Ring
    inputs: Ring
    scorer: StreamScorer = field(repr=False)


class DriftMonitor:
    def __init__(
        self, *, window: int = WINDOW, refresh_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window, self.refresh_s, self.clock = window, refresh_s, clock
        self.streams: dict[str, StreamWindow] = {}
        self._figures: list[dict[str, Any]] = []
        self._next_refresh = 0.0
        # observe runs on the processor's thread, figures on the API's: the windows change under one lock
        self._lock = threading.Lock()

    def observe(self, scorer: StreamScorer, res: ScoreBatch, warm: np.ndarray) -> None:
        """A champion's scored batch (`warm`: the events of entities past min_history). Never raises: the
        gauges are a view of the stream, not part of it."""
        try:
            with self._lock:
                w = self._window(scorer)
                w.scores.extend(res.raw_scores[warm][:, None])
                if w.channels:
                    w.inputs.extend(res.observed[:, list(w.channels.values())])
                if self.clock() >= self._next_refresh:
                    self._refresh()
        except Exception:  # noqa: BLE001 - a figure we cannot compute must not stop scoring
            log.exception("drift figures of %s not updated", scorer.spec.name)

    def refresh(self) -> None:
        """Recompute every stream's figures and set the gauges."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        self._next_refresh = self.clock() + self.refresh_s
        self._figures = [self._stream_figures(name, w) for name, w in sorted(self.streams.items())]

    def figures(self) -> list[dict[str, Any]]:
        """The figures, one dict per stream (what /api/drift serves): recomputed when older than refresh_s, so
        a stream that went quiet right after a burst does not keep showing the burst's first batch."""
        with self._lock:
            if self.clock() >= self._next_refresh:
                try:
                    self._refresh()
                except Exception:  # noqa: BLE001 - the last figures are still an answer
                    log.exception("drift figures not updated")
            return self._figures

    def _window(self, scorer: StreamScorer) -> StreamWindow:
        name, version = scorer.spec.name, scorer.model_version
        w = self.streams.get(name)
        if w is not None and w.version == version:
            w.scorer = scorer
            return w
        card = scorer.checkpoint.card if scorer.checkpoint is not None else {}
        try:
            quantiles: tuple[np.ndarray, np.ndarray] | None = drift.quantile_table(drift.card_score_quantiles(card))
        except ValueError as exc:
            log.info("%s (%s): no score drift gauge: %s", name, version, exc)
            quantiles = None
        stats = {
            c: s
            for c, s in (card.get("channel_stats") or {}).items()
            if c in scorer.spec.feature_names and s.get("quantiles")
        }
        channels = {c: scorer.spec.feature_names.index(c) for c in stats}
        if w is not None:  # a new champion: its own card, its own window
            self._clear(name, w)
        w = self.streams[name] = StreamWindow(
            version,
            quantiles,
            channels,
            stats,
            Ring(self.window, 1),
            Ring(self.window, max(len(channels), 1)),
            scorer,
        )
        return w

    def _clear(self, name: str, old: StreamWindow) -> None:
        """The old version's PSI gauges go: until the new one has enough values, there is no figure."""
        for gauge, labels in [(metrics.SCORE_PSI, (name,)), *((metrics.INPUT_PSI, (name, c)) for c in old.channels)]:
            with contextlib.suppress(KeyError):  # never set (too few values)
                gauge.remove(*labels)

    def _stream_figures(self, name: str, w: StreamWindow) -> dict[str, Any]:
        store = w.scorer.store
        live = store.live_slots()
        warming = int((store.count[live] < w.scorer.min_history).sum())
        share = drift.warming_share(warming, len(live))
        metrics.WARMING_SHARE.labels(name).set(share)
        out: dict[str, Any] = {
            "stream": name,
            "model_version": w.version,
            "live_entities": len(live),
            "warming_share": share,
            "score": None,
            "inputs": [],
        }
        if w.score_quantiles is not None and w.scores.filled >= MIN_VALUES:
            value = drift.psi(w.scores.column(0), *w.score_quantiles)
            metrics.SCORE_PSI.labels(name).set(value)
            out["score"] = {"n": w.scores.filled, "psi": value, "reading": drift.reading(value)}
        if w.inputs.filled >= MIN_VALUES:
            live_inputs = {c: w.inputs.column(j) for j, c in enumerate(w.channels)}
            for d in drift.channel_drift(live_inputs, w.channel_stats):
                if d.psi is None:
                    continue
                metrics.INPUT_PSI.labels(name, d.channel).set(d.psi)
                out["inputs"].append(
                    {
                        "channel": d.channel,
                        "n": d.n,
                        "psi": d.psi,
                        "reading": drift.reading(d.psi),
                        "mean_shift": d.mean_shift,
                    }
                )
        return out
