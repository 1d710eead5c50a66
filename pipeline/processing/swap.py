"""Rolling a promoted model version out into the running service (issue #14). At a checkpoint boundary, where
every output of the serving models is durable and committed and nothing is in flight, a stream served from the
registry (its model is NAME@ALIAS) whose alias moved switches to the new version's scorer: no event is lost or
scored twice, and each alert carries the version that scored it. The live entities keep what the new model can
use (pipeline.state.store.CarryOver); the processor snapshots the stream's partitions at the next checkpoint, so
a restart resumes state consistent with the new version.

A version that cannot serve the stream (other channels, unreadable) is refused: one ERROR line naming stream,
version and the difference, pipeline_model_swaps_total{result="refused"}, and the old version keeps serving.

A stream whose challenger is a registry alias (NAME@challenger) follows it the same way: a challenger promoted
while running starts shadow scoring at the next boundary (its entities warm up from there), one promoted to
champion or cleared stops it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pipeline import metrics
from pipeline.errors import ConfigError, PipelineError, ScoringError
from pipeline.features.streams import TransactionStream
from pipeline.registry.registry import ModelRegistry
from pipeline.scoring.scorer import StreamScorer
from pipeline.streams.config import Stream
from pipeline.streams.serving import ServedStream, resolve_model

log = logging.getLogger(__name__)

ScorerBuilder = Callable[[ServedStream], StreamScorer]  # as the service builds a stream's scorer at start


@dataclass
class Swaps:
    """What changed at one poll: topic -> the new champion scorer; topic -> the new challenger (None: stop)."""

    champions: dict[str, StreamScorer] = field(default_factory=dict)
    challengers: dict[str, StreamScorer | None] = field(default_factory=dict)


class ModelWatcher:
    def __init__(
        self, registry: ModelRegistry, streams: Mapping[str, Stream], build: ScorerBuilder, *, poll_s: float
    ) -> None:
        """streams: topic -> the stream file's stream; those served from a registry alias (NAME@ALIAS) are
        watched (see `watched`)."""
        self.registry, self.streams, self.build, self.poll_s = registry, watched(streams), build, poll_s
        self.challenged = challenged(streams)
        self.next_poll = 0.0  # monotonic time of the next registry query
        self.generation: int | None = None  # the registry's generation last seen; None: compare every stream
        self.carried_seen: dict[str, tuple[int, int]] = {}  # topic -> (id of its store, carried_over logged)

    def poll(
        self,
        scorers: Mapping[str, StreamScorer],
        now: float,
        challengers: Mapping[str, StreamScorer] | None = None,
    ) -> Swaps:
        """The champions of newly promoted versions (their live entities taken over from the serving ones) and
        the challengers that changed (`challengers`: the ones scoring now). At most one generation query per
        poll_s; the streams' aliases only when it moved."""
        swaps = Swaps()
        if now < self.next_poll:
            return swaps
        self.next_poll = now + self.poll_s
        self.log_carried_over(scorers)
        try:
            generation = self.registry.generation()
            if generation != self.generation:
                for topic, stream in self.streams.items():
                    scorer = self.promoted(stream, scorers[topic])
                    if scorer is not None:
                        swaps.champions[topic] = scorer
                for topic, stream in self.challenged.items():
                    champion = swaps.champions.get(topic, scorers[topic])
                    current = (challengers or {}).get(topic)
                    change = self.challenger(stream, champion, current)
                    if change is not current:
                        swaps.challengers[topic] = change
                self.generation = generation
        except PipelineError as exc:  # the database, not the version: ask again at the next poll
            log.warning(
                "model registry not readable (%s); the serving versions stay, next try in %gs", exc, self.poll_s
            )
        return swaps

    def challenger(self, stream: Stream, champion: StreamScorer, current: StreamScorer | None) -> StreamScorer | None:
        """The challenger that should score in the shadow now: `current` when its alias did not move (or the
        new one cannot shadow this champion), a new scorer, or None (cleared, or promoted to champion)."""
        ref = stream.challenger_ref
        state = None if ref is None or ref.alias is None else self.registry.current(ref.name, ref.alias)
        if state is None or state.version == champion.model_version:
            if current is not None:
                log.info("stream %r: challenger %s stops shadow scoring", stream.name, current.model_version)
            return None
        if current is not None and state.version == current.model_version:
            return current
        try:
            scorer = self.build(ServedStream(stream, resolve_model(stream, self.registry, stream.challenger)))
            if scorer.spec.feature_names != champion.spec.feature_names:
                raise ConfigError(
                    f"it reads {', '.join(scorer.spec.feature_names)}; the champion's columns are "
                    f"{', '.join(champion.spec.feature_names)} (a challenger scores the champion's features)"
                )
        except (ConfigError, ScoringError) as exc:
            log.error("stream %r: challenger %s refused: %s", stream.name, state.version, exc)
            metrics.MODEL_SWAPS.labels(stream.name, "refused").inc()
            return current
        log.info("stream %r: challenger %s scores in the shadow from this checkpoint", stream.name, state.version)
        return scorer

    def promoted(self, stream: Stream, serving: StreamScorer) -> StreamScorer | None:
        """The scorer of the version stream's alias points at now, when it is another one and can serve."""
        ref = stream.model_ref
        state = self.registry.current(ref.name, str(ref.alias))
        if state is None or state.version == serving.model_version:
            return None
        try:
            served = resolve_model(stream, self.registry)
            if served.version == serving.model_version:  # the alias moved back meanwhile
                return None
            scorer = self.build(ServedStream(stream, served))
            check_partition_state(serving, scorer)
        except (ConfigError, ScoringError) as exc:
            log.error(
                "stream %r: model %s refused, %s keeps serving: %s",
                stream.name,
                state.version,
                serving.model_version,
                exc,
            )
            metrics.MODEL_SWAPS.labels(stream.name, "refused").inc()
            return None
        carry = scorer.store.adopt(serving.store)
        metrics.MODEL_SWAPS.labels(stream.name, "applied").inc()
        log.log(
            logging.INFO if carry.stats else logging.WARNING,
            "stream %r: %s -> %s at a checkpoint boundary; %d live entities: %s",
            stream.name,
            serving.model_version,
            scorer.model_version,
            len(scorer.store),
            carry.describe(),
        )
        return scorer

    def log_carried_over(self, scorers: Mapping[str, StreamScorer]) -> None:
        """One line per stream and poll for entities resumed from another model's snapshot since the last one
        (evicted or not yet seen when the version changed), not one per entity."""
        for topic in self.streams:
            store = scorers[topic].store
            seen_store, seen = self.carried_seen.get(topic, (id(store), 0))
            seen = seen if seen_store == id(store) else 0
            if store.carried_over > seen:
                log.info(
                    "stream %r: %d entities resumed from snapshots of another model (%s kept what carries over)",
                    scorers[topic].spec.name,
                    store.carried_over - seen,
                    scorers[topic].model_version,
                )
            self.carried_seen[topic] = (id(store), store.carried_over)


def watched(streams: Mapping[str, Stream]) -> dict[str, Stream]:
    """The streams whose model is a registry alias (NAME@ALIAS): a pinned version id or a file never moves."""
    return {t: s for t, s in streams.items() if s.model_ref.source == "registry" and s.model_ref.alias is not None}


def challenged(streams: Mapping[str, Stream]) -> dict[str, Stream]:
    """The streams whose challenger is a registry alias (NAME@challenger): followed while running."""
    out = {}
    for topic, stream in streams.items():
        ref = stream.challenger_ref
        if ref is not None and ref.source == "registry" and ref.alias is not None:
            out[topic] = stream
    return out


def check_partition_state(serving: StreamScorer, new: StreamScorer) -> None:
    """A transactions stream's partitions hold a terminal context (and its label feedback) made for the serving
    model's features and parameters: a model that needs another one takes over at a restart, not while running."""
    old_spec, new_spec = serving.spec, new.spec
    if not isinstance(old_spec, TransactionStream) or not isinstance(new_spec, TransactionStream):
        return
    old_card = serving.checkpoint.card if serving.checkpoint is not None else {}
    new_card = new.checkpoint.card if new.checkpoint is not None else {}

    def context(spec: TransactionStream, card: Mapping[str, object]) -> tuple[object, ...]:
        partitions = card.get("terminal_context_partitions", 1) if spec.terminal_context else None
        return spec.feature_names, spec.terminal_tau_s, spec.fraud_feedback_tau_s, partitions

    if context(old_spec, old_card) != context(new_spec, new_card):
        raise ConfigError(
            f"its features or terminal context ({', '.join(new_spec.feature_names)}) differ from the serving "
            f"model's ({', '.join(old_spec.feature_names)}): the partitions' terminal context does not carry over "
            "while running; restart the service to serve it"
        )
