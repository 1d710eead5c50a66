"""Settings from environment (prefix PIPELINE_, plus KAFKA_BOOTSTRAP and DATABASE_URL) or a .env file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.scoring.knobs import ThresholdKnobs


class AlertSettings(BaseSettings):
    """Incident lifecycle and the alerts topic (see pipeline.alerts.lifecycle)."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_ALERTS_", extra="ignore")

    incidents: bool = Field(True, description="derive incidents and publish them to the alerts topic")
    resolve_after: int = Field(5, description="consecutive normal events that resolve an incident")
    suppress_s: float = Field(300.0, description="per-entity window (event time) between 'updated' messages")
    max_gap_s: float = Field(3600.0, description="an anomaly after this much silence opens a new incident")
    sample_ring: int = Field(256, description="recent scores kept per entity with an incident (for the page)")


class Settings(BaseSettings):
    # nested sections split once after their name: PIPELINE_THRESHOLD_FLOOR_RATIO -> threshold.floor_ratio
    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_", env_file=".env", extra="ignore", env_nested_delimiter="_", env_nested_max_split=1
    )

    kafka_bootstrap: str | None = Field(
        None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP", "PIPELINE_KAFKA_BOOTSTRAP"),
        description="host:port of a Kafka broker; unset = start the embedded Tansu broker",
    )
    database_url: str = Field(
        "sqlite:///var/pipeline.db",
        validation_alias=AliasChoices("DATABASE_URL", "PIPELINE_DATABASE_URL"),
        description="SQLAlchemy URL of the alert database",
    )
    transactions_topic: str = "transactions"
    sensors_topic: str = "sensor-readings"
    dlq_topic: str = "dead-letter"
    alerts_topic: str = "alerts"
    labels_topic: str = Field(
        "transaction-labels",
        description="label feedback (schemas/transaction_label), "
        "read when the transactions model uses terminal_fraud_risk",
    )
    topic_partitions: int = 4
    group_id: str = "anomaly-pipeline"
    run_id: str = Field("live", description="namespace of state, offsets and alerts; replays use their own")
    streams_file: Path | None = Field(
        None,
        description="the stream file to serve (pipeline/streams/default.toml shows the keys): its streams, "
        "topics and models; unset = the bundled two streams on the *_topic settings with models_dir's models",
    )
    models_dir: Path | None = Field(None, description="where checkpoints live; unset = the bundled models/")
    model_poll_s: float = Field(
        5.0,
        gt=0.0,
        description="how often (at most) a running service asks the model registry whether a version was "
        "promoted for a stream it serves from the registry (NAME@ALIAS); one cheap query, at a checkpoint",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "int8"] = Field(
        "fp32",
        description="scoring precision, applied when the fp32 checkpoint is loaded: int8 = dynamic "
        "quantization (CPU), bf16 = autocast where the CPU has native bf16 (else fp32); CUDA: autocast",
    )
    torch_threads: int = Field(1, description="intra-op threads for CPU scoring; 0 = torch default (all cores)")
    max_batch_records: int = 5000
    poll_timeout_ms: int = 50
    fetch_max_wait_ms: int = Field(20, description="longest the broker may hold a fetch (latency vs idle requests)")
    commit_interval_ms: int = 200
    snapshot_interval_s: float = 10.0
    entity_ttl_s: float = Field(3600.0, description="idle entities (by event time) leave memory after this")
    max_live_entities: int = 1_000_000
    max_message_bytes: int = 65536
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    db_retry_max_s: float = 30.0
    offset_reset: Literal["earliest", "latest", "fail"] = Field(
        "earliest",
        description="a stored position outside the broker's log (topic recreated, broker lost its "
        "log, retention): read from the log start, skip to its end, or stop; always logged as an ERROR",
    )
    dedupe_window: int = Field(
        10_000,
        ge=0,
        description="payments: transaction ids remembered per partition (in "
        "its snapshotted state); a resend inside the window is dropped, not scored; 0 = off",
    )
    allowed_lateness_s: float = Field(
        60.0,
        ge=0.0,
        description="an event up to this far behind its entity's latest "
        "event time is scored without updating the entity's state; further behind: "
        "dead-lettered as out_of_order",
    )
    score_sample_rate: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="share of scored events (champion and challenger, warm entities) whose score goes into "
        "model_score_samples for `pipeline models drift|compare`; picked by a hash of topic, partition and "
        "offset, so a replay picks the same events; 0 = off",
    )
    log_level: str = "INFO"
    log_json: bool = False
    sensor_channels: list[str] = [
        "Accelerometer1RMS",
        "Accelerometer2RMS",
        "Current",
        "Pressure",
        "Temperature",
        "Thermocouple",
        "Voltage",
        "Volume Flow RateRMS",
    ]
    threshold: ThresholdKnobs = Field(
        ThresholdKnobs(), description="per-entity adaptive thresholds (PIPELINE_THRESHOLD_Z etc.; see ThresholdKnobs)"
    )
    alerts: AlertSettings = Field(default_factory=lambda: AlertSettings())
