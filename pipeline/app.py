"""Wiring: settings -> models, broker clients, database -> a Processor. The only module that joins
the Kafka layer, the SQL layer and the pure core.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.lstm_ae import Checkpoint, bundled_checkpoint_path
from models.lstm_forecast import ForecastCheckpoint, load_model
from pipeline.alerts.lifecycle import IncidentTracker, LifecyclePolicy
from pipeline.alerts.outbox import OutboxRelay
from pipeline.checkpointing import IncidentLoads
from pipeline.checkpointing.rows import REPLAY_GROUP
from pipeline.config import Settings
from pipeline.errors import ConfigError, ScoringError
from pipeline.features.streams import StreamSpec, TransactionStream
from pipeline.kafka.client import KafkaDeadLetterSink, KafkaPublisher, KafkaSource, ensure_topics
from pipeline.processing.retry import DbRetry
from pipeline.processing.swap import ModelWatcher, challenged, watched
from pipeline.processor import Processor, ProcessorOptions
from pipeline.registry import ModelRegistry
from pipeline.scoring.factory import build_scorer
from pipeline.scoring.scorer import StreamScorer
from pipeline.sinks import AlertQueries, Database, SqlCheckpointStore, SqlRegistryStore
from pipeline.streams.config import Stream, load_streams, parse_model_ref
from pipeline.streams.serving import ServedStream, resolve_model, serve

log = logging.getLogger(__name__)
STREAMS = ("transactions", "sensors")


def checkpoint_path(settings: Settings, stream: str) -> Path:
    if settings.models_dir is not None:
        return settings.models_dir / f"{stream}.pt"
    return bundled_checkpoint_path(stream)


def ensure_models(settings: Settings, train_if_missing: bool = True) -> dict[str, Checkpoint | ForecastCheckpoint]:
    paths = {s: checkpoint_path(settings, s) for s in STREAMS}
    if settings.models_dir is not None and not settings.models_dir.is_dir():  # a typo must not mean stand-ins
        raise ConfigError(
            f"PIPELINE_MODELS_DIR {settings.models_dir}: no such folder (an existing empty folder gets small "
            "default models trained on simulated traffic)"
        )
    missing = [s for s, p in paths.items() if not p.exists()]
    if missing:
        if not train_if_missing:
            raise ConfigError(
                f"no model checkpoint for {', '.join(missing)} (looked in {paths[missing[0]].parent}); "
                "run `pipeline train` first"
            )
        from pipeline.training import train_default_models

        out = paths[missing[0]].parent
        log.info(
            "no %s checkpoint in %s: training a small default model on simulated normal traffic%s",
            " or ".join(missing),
            out,
            "" if len(missing) == len(paths) else " (the other stream's checkpoint there is kept)",
        )
        train_default_models(out, settings.sensor_channels, only=missing)
    # the checkpoint names its family (autoencoder or stateful forecaster); the scorer follows the card
    return {s: load_model(p) for s, p in paths.items()}


def build_scorers(
    settings: Settings, checkpoints: dict[str, Checkpoint | ForecastCheckpoint]
) -> dict[str, StreamScorer]:
    """topic -> scorer of the bundled streams (no stream file): topics from the *_topic settings, each
    model's channels from its card (settings.sensor_channels where the card names none)."""
    topics = {"transactions": settings.transactions_topic, "sensors": settings.sensors_topic}
    scorers = {topics[stream]: scorer_for(settings, stream, ckpt) for stream, ckpt in checkpoints.items()}
    sensors = scorers.get(settings.sensors_topic)
    if "sensor_channels" in settings.model_fields_set and sensors is not None:
        served = list(sensors.spec.feature_names)
        if served != list(settings.sensor_channels):  # set on purpose, and silently not what is served
            log.warning("PIPELINE_SENSOR_CHANNELS is ignored: the sensors model's card names its channels %s", served)
    return scorers


def served_streams(streams: Sequence[Stream], db: Database) -> list[ServedStream]:
    """A stream file's streams, each with its model (registry references resolve in `db`)."""
    return serve(list(streams), ModelRegistry(SqlRegistryStore(db)))


def stream_scorers(settings: Settings, served: list[ServedStream]) -> dict[str, StreamScorer]:
    """topic -> scorer of each stream of a stream file, named as the file names it."""
    return {s.stream.topic: stream_scorer(settings, s) for s in served}


def stream_scorer(settings: Settings, served: ServedStream) -> StreamScorer:
    return scorer_for(
        settings, served.spec(settings.max_message_bytes), served.model.checkpoint, served.stream.context_gap_s
    )


def challenger_scorers(settings: Settings, served: list[ServedStream], db: Database) -> dict[str, StreamScorer]:
    """topic -> the scorer of each stream's challenger (shadow scoring). It scores the champion's featurized
    columns, so it must read the champion's features in the same order."""
    registry = ModelRegistry(SqlRegistryStore(db))
    out: dict[str, StreamScorer] = {}
    for s in served:
        if s.stream.challenger is None:
            continue
        ref = parse_model_ref(s.stream.challenger)
        if ref.alias is not None and registry.current(ref.name, ref.alias) is None:
            # declared ahead of time: shadow scoring starts with the next start after a promote --challenger
            log.info("stream %s: no version is promoted to %s yet; no shadow scoring", s.stream.name, ref.alias)
            continue
        challenger = resolve_model(s.stream, registry, s.stream.challenger)
        try:
            out[s.stream.topic] = scorer_for(
                settings, s.spec(settings.max_message_bytes), challenger.checkpoint, s.stream.context_gap_s
            )
        except ScoringError as exc:
            raise ConfigError(f"stream {s.stream.name!r}: challenger {challenger.version}: {exc}") from None
        log.info("stream %s: challenger %s scores in shadow", s.stream.name, challenger.version)
    return out


def model_watcher(settings: Settings, served: list[ServedStream], db: Database) -> ModelWatcher | None:
    """Switches the streams served from a registry alias (champion or challenger) to versions promoted while running
    (None: no stream names an alias)."""
    streams = {s.stream.topic: s.stream for s in served}
    if not watched(streams) and not challenged(streams):
        return None

    def build(s: ServedStream) -> StreamScorer:
        return stream_scorer(settings, s)

    return ModelWatcher(ModelRegistry(SqlRegistryStore(db)), streams, build, poll_s=settings.model_poll_s)


def scorer_for(
    settings: Settings,
    stream: str | StreamSpec,
    checkpoint: Checkpoint | ForecastCheckpoint,
    context_gap_s: float | None = None,
) -> StreamScorer:
    return build_scorer(
        stream,
        checkpoint,
        channels=settings.sensor_channels,
        knobs=settings.threshold,
        device=settings.device,
        precision=settings.precision,
        allowed_lateness_s=settings.allowed_lateness_s,
        context_gap_s=context_gap_s,
        max_message_bytes=settings.max_message_bytes,
    )


def label_topics(settings: Settings, scorers: dict[str, StreamScorer]) -> dict[str, str]:
    """labels topic -> the transactions topic whose model reads label feedback (one labels topic: one such
    stream)."""
    fed = [t for t, s in scorers.items() if isinstance(s.spec, TransactionStream) and s.spec.label_feedback]
    if len(fed) > 1:
        raise ConfigError(
            f"the models of {', '.join(fed)} all read label feedback, but one labels topic "
            f"({settings.labels_topic}) feeds one transactions stream"
        )
    return {settings.labels_topic: fed[0]} if fed else {}


def check_partitioning(
    settings: Settings,
    scorers: dict[str, StreamScorer],
    labels: dict[str, str],
    partitions_for: Callable[[str], list[int]],
) -> None:
    """Terminal context is per partition, so a model trained on one split of the customers must be served
    on the same split (else its terminal features shift: train/serve skew); labels must be co-partitioned."""
    for served, scorer in scorers.items():
        if not (isinstance(scorer.spec, TransactionStream) and scorer.spec.terminal_context):
            continue
        have = len(partitions_for(served))
        card = scorer.checkpoint.card if scorer.checkpoint is not None else {}
        trained = int(card.get("terminal_context_partitions", 1))
        if have != trained:
            raise ConfigError(
                f"{scorer.spec.name} model {scorer.model_version} computed terminal context over {trained} "
                f"partition(s); topic {served!r} has {have}. Serve it on a topic with "
                f"{trained}, or retrain: pipeline evaluate --format transactions --partitions {have} "
                "--save-model ..."
            )
        for topic, fed in labels.items():
            if fed != served:
                continue
            n = len(partitions_for(topic))
            if n != have:
                raise ConfigError(
                    f"labels topic {topic!r} has {n} partitions and {fed!r} {have}: "
                    "label feedback needs both keyed by customer with the same partition count"
                )
            log.info("label feedback: %s -> terminal fraud risk of %s", topic, fed)


def options_from(settings: Settings) -> ProcessorOptions:
    """The processor's options; alert severities in the bands the incident lifecycle uses."""
    return ProcessorOptions.from_settings(settings, severity_bands=lifecycle_policy(settings).severity_bands)


@dataclass
class Service:
    processor: Processor
    source: KafkaSource
    dlq: KafkaDeadLetterSink
    db: Database
    queries: AlertQueries  # what the API and the demo read
    alerts_publisher: KafkaPublisher | None = None

    def not_ready(self) -> str | None:
        """Why /readyz answers 503 (None: ready)."""
        stopped = dict(self.source.stopped)  # the poll thread replaces it meanwhile
        if stopped:
            return "partitions stopped: " + "; ".join(v for _, v in sorted(stopped.items()))
        if not self.processor.ready.is_set():
            return "waiting for partitions or the database"
        return None

    def close(self) -> None:
        self.source.close()
        self.dlq.close()
        if self.alerts_publisher is not None:
            self.alerts_publisher.close()
        self.db.dispose()


def all_topics(settings: Settings) -> list[str]:
    return [settings.transactions_topic, settings.sensors_topic, settings.dlq_topic, settings.alerts_topic]


def check_run_owner(settings: Settings, store: SqlCheckpointStore) -> None:
    """A run belongs to one consumer group: positions are kept per group but entity state per run, so a new
    group re-read the topic against another group's end-of-stream state (7,190 of 8,000 events dead-lettered
    out of order, 17 false alerts); the run id of a replay is not a service's."""
    groups = store.position_groups(settings.run_id)
    others = groups - {settings.group_id, REPLAY_GROUP}
    if REPLAY_GROUP in groups and settings.group_id not in groups:
        raise ConfigError(f"PIPELINE_RUN_ID {settings.run_id!r} is a replay's run id: pick another for the service")
    if REPLAY_GROUP in groups:  # written by a replay into this run before replay checked for a service's run id
        log.warning("run %r also holds a replay's positions; they are ignored", settings.run_id)
    if others:
        owner = min(others)
        raise ConfigError(
            f"PIPELINE_RUN_ID {settings.run_id!r} belongs to consumer group {owner!r}: keep "
            f"PIPELINE_GROUP_ID={owner}, or give group {settings.group_id!r} a new PIPELINE_RUN_ID"
        )


def build_service(settings: Settings, bootstrap: str, *, train_if_missing: bool = True) -> Service:
    import torch

    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    declared = None if settings.streams_file is None else load_streams(settings.streams_file).streams
    # the input topics a bad setting would clash with, before a database is created or migrated for nothing
    inputs = [settings.transactions_topic, settings.sensors_topic] if declared is None else [s.topic for s in declared]
    clash = settings.read_topic_clash(inputs)
    if clash is not None:
        raise ConfigError(clash)
    db = Database(settings.database_url)
    db.create_schema()
    store = SqlCheckpointStore(db)
    check_run_owner(settings, store)
    models, challengers = None, None
    if declared is None:  # the bundled streams on the *_topic settings, models from models_dir
        scorers = build_scorers(settings, ensure_models(settings, train_if_missing))
    else:
        served = served_streams(declared, db)
        scorers = stream_scorers(settings, served)
        models = model_watcher(settings, served, db)
        challengers = challenger_scorers(settings, served, db)
    labels = label_topics(settings, scorers)
    clash = settings.read_topic_clash(labels)  # the scorers' topics are the inputs checked above
    if clash is not None:
        raise ConfigError(clash)
    ensure_topics(bootstrap, [*scorers, settings.dlq_topic, settings.alerts_topic, *labels], settings.topic_partitions)
    source = KafkaSource(
        bootstrap,
        settings.group_id,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )
    dlq: KafkaDeadLetterSink | None = None
    publisher: KafkaPublisher | None = None
    try:  # the clients hold sockets and threads: a failure past this point must not leave them open
        check_partitioning(settings, scorers, labels, source.partitions_for)
        dlq = KafkaDeadLetterSink(bootstrap, settings.dlq_topic)
        retry = DbRetry(settings.db_retry_max_s)
        tracker, relay = None, None
        if settings.alerts.incidents:
            publisher = KafkaPublisher(bootstrap, settings.alerts_topic)
            tracker, relay = incident_tracker(settings, store, retry), OutboxRelay(store, publisher, settings.run_id)
        processor = Processor(
            source,
            store,
            dlq,
            scorers,
            options_from(settings),
            label_topics=labels,
            tracker=tracker,
            relay=relay,
            db_retry=retry,
            models=models,
            challengers=challengers,
        )
    except BaseException:
        for client in (publisher, dlq, source):
            if client is not None:
                client.close()
        raise
    return Service(processor, source, dlq, db, AlertQueries(db), publisher)


def lifecycle_policy(settings: Settings) -> LifecyclePolicy:
    a = settings.alerts
    return LifecyclePolicy(
        resolve_after=a.resolve_after, suppress_s=a.suppress_s, max_gap_s=a.max_gap_s, sample_ring=a.sample_ring
    )


def incident_tracker(settings: Settings, db: IncidentLoads, retry: DbRetry) -> IncidentTracker:
    """The incident lifecycle (written in each checkpoint's transaction); its loads wait out a database outage."""
    run_id = settings.run_id

    def load(topic: str, partition: int) -> list[dict[str, Any]]:
        return retry(
            f"load open incidents of {topic}[{partition}]", lambda: db.open_incidents(run_id, topic, partition)
        )

    return IncidentTracker(run_id, lifecycle_policy(settings), loader=load)
