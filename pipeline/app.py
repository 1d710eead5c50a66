"""Wiring: settings -> models, broker clients, database -> a Processor. The only module that joins
the Kafka layer, the SQL layer and the pure core.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.lstm_ae import Checkpoint, bundled_checkpoint_path
from models.lstm_forecast import ForecastCheckpoint, load_model
from pipeline.alerts.lifecycle import IncidentTracker, LifecyclePolicy
from pipeline.alerts.outbox import OutboxRelay
from pipeline.checkpointing import IncidentLoads
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.features.streams import TransactionStream
from pipeline.kafka.client import KafkaDeadLetterSink, KafkaPublisher, KafkaSource, ensure_topics
from pipeline.processing.retry import DbRetry
from pipeline.processor import Processor, ProcessorOptions
from pipeline.scoring.factory import build_scorer
from pipeline.scoring.scorer import StreamScorer
from pipeline.sinks import AlertQueries, Database, SqlCheckpointStore

log = logging.getLogger(__name__)
STREAMS = ("transactions", "sensors")


def checkpoint_path(settings: Settings, stream: str) -> Path:
    if settings.models_dir is not None:
        return settings.models_dir / f"{stream}.pt"
    return bundled_checkpoint_path(stream)


def ensure_models(settings: Settings, train_if_missing: bool = True) -> dict[str, Checkpoint | ForecastCheckpoint]:
    paths = {s: checkpoint_path(settings, s) for s in STREAMS}
    missing = [s for s, p in paths.items() if not p.exists()]
    if missing:
        if not train_if_missing:
            raise ConfigError(
                f"no model checkpoint for {', '.join(missing)} (looked in {paths[missing[0]].parent}); "
                "run `pipeline train` first"
            )
        from pipeline.training import train_default_models

        out = paths[missing[0]].parent
        log.info("no checkpoints in %s: training small default models on simulated normal traffic", out)
        train_default_models(out, settings.sensor_channels)
    # the checkpoint names its family (autoencoder or stateful forecaster); the scorer follows the card
    return {s: load_model(p) for s, p in paths.items()}


def build_scorers(
    settings: Settings, checkpoints: dict[str, Checkpoint | ForecastCheckpoint]
) -> dict[str, StreamScorer]:
    """topic -> scorer"""
    topics = {"transactions": settings.transactions_topic, "sensors": settings.sensors_topic}
    return {
        topics[stream]: build_scorer(
            stream,
            ckpt,
            channels=settings.sensor_channels,
            knobs=settings.threshold,
            device=settings.device,
            precision=settings.precision,
            allowed_lateness_s=settings.allowed_lateness_s,
            max_message_bytes=settings.max_message_bytes,
        )
        for stream, ckpt in checkpoints.items()
    }


def label_topics(settings: Settings, scorers: dict[str, StreamScorer]) -> dict[str, str]:
    """labels topic -> transactions topic, when the transactions model reads label feedback."""
    scorer = scorers.get(settings.transactions_topic)
    if scorer is not None and isinstance(scorer.spec, TransactionStream) and scorer.spec.label_feedback:
        return {settings.labels_topic: settings.transactions_topic}
    return {}


def check_partitioning(
    settings: Settings,
    scorers: dict[str, StreamScorer],
    labels: dict[str, str],
    partitions_for: Callable[[str], list[int]],
) -> None:
    """Terminal context is per partition, so a model trained on one split of the customers must be served
    on the same split (else its terminal features shift: train/serve skew); labels must be co-partitioned."""
    scorer = scorers.get(settings.transactions_topic)
    if scorer is None or not (isinstance(scorer.spec, TransactionStream) and scorer.spec.terminal_context):
        return
    have = len(partitions_for(settings.transactions_topic))
    card = scorer.checkpoint.card if scorer.checkpoint is not None else {}
    trained = int(card.get("terminal_context_partitions", 1))
    if have != trained:
        raise ConfigError(
            f"transactions model {scorer.model_version} computed terminal context over {trained} "
            f"partition(s); topic {settings.transactions_topic!r} has {have}. Serve it on a topic with "
            f"{trained}, or retrain: pipeline evaluate --format transactions --partitions {have} "
            "--save-model ..."
        )
    for topic, fed in labels.items():
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


def build_service(settings: Settings, bootstrap: str, *, train_if_missing: bool = True) -> Service:
    import torch

    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    checkpoints = ensure_models(settings, train_if_missing)
    db = Database(settings.database_url)
    db.create_schema()
    store = SqlCheckpointStore(db)
    scorers = build_scorers(settings, checkpoints)
    labels = label_topics(settings, scorers)
    ensure_topics(bootstrap, all_topics(settings) + list(labels), settings.topic_partitions)
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
