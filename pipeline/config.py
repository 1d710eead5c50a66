"""Settings from environment (prefix PIPELINE_, plus KAFKA_BOOTSTRAP and DATABASE_URL) or a .env file."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BeforeValidator,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.scoring.knobs import ThresholdKnobs

# the bundled sensors stream's channels: SKAB's eight (pipeline.simulate writes readings with these)
SENSOR_CHANNELS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)

# Kafka's own rule for a topic name (the client refuses others only when the service subscribes)
TopicName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,249}$")]


def check_run_id(value: str) -> str:
    """A run id keys every table (VARCHAR(64)): a longer one failed every checkpoint on PostgreSQL, retried
    forever; an empty one or one with spaces cannot be typed back on a command line."""
    if not re.fullmatch(r"\S{1,64}", value):
        raise ValueError("a run id is 1-64 characters without spaces")
    return value


RunId = Annotated[str, AfterValidator(check_run_id)]


class AlertSettings(BaseSettings):
    """Incident lifecycle and the alerts topic (see pipeline.alerts.lifecycle)."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_ALERTS_", extra="ignore")

    incidents: bool = Field(True, description="derive incidents and publish them to the alerts topic")
    resolve_after: int = Field(5, ge=1, description="consecutive normal events that resolve an incident")
    suppress_s: float = Field(
        300.0, ge=0.0, allow_inf_nan=False, description="per-entity window (event time) between 'updated' messages"
    )
    max_gap_s: float = Field(
        3600.0, gt=0.0, allow_inf_nan=False, description="an anomaly after this much silence opens a new incident"
    )
    sample_ring: int = Field(256, ge=1, description="recent scores kept per entity with an incident (for the page)")


class Settings(BaseSettings):
    # nested sections split once after their name: PIPELINE_THRESHOLD_FLOOR_RATIO -> threshold.floor_ratio
    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_", env_file=".env", extra="ignore", env_nested_delimiter="_", env_nested_max_split=1
    )

    kafka_bootstrap: str | None = Field(
        None,
        min_length=1,  # set but empty started the embedded broker, which reads nothing of the real one's
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP", "PIPELINE_KAFKA_BOOTSTRAP"),
        description="host:port of a Kafka broker; unset = start the embedded Tansu broker",
    )
    database_url: str = Field(
        "sqlite:///var/pipeline.db",
        validation_alias=AliasChoices("DATABASE_URL", "PIPELINE_DATABASE_URL"),
        description="SQLAlchemy URL of the alert database",
    )
    transactions_topic: TopicName = "transactions"
    sensors_topic: TopicName = "sensor-readings"
    dlq_topic: TopicName = "dead-letter"
    alerts_topic: TopicName = "alerts"
    labels_topic: TopicName = Field(
        "transaction-labels",
        description="label feedback (schemas/transaction_label), "
        "read when the transactions model uses terminal_fraud_risk",
    )
    topic_partitions: int = Field(4, ge=1)
    group_id: str = Field("anomaly-pipeline", pattern=r"^\S{1,255}$")
    run_id: RunId = Field("live", description="namespace of state, offsets and alerts; replays use their own")
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
    torch_threads: int = Field(1, ge=0, description="intra-op threads for CPU scoring; 0 = torch default (all cores)")
    max_batch_records: int = Field(5000, ge=1, le=1_000_000)
    poll_timeout_ms: int = Field(50, ge=0)
    fetch_max_wait_ms: int = Field(  # (kafka-python wants it below its 30 s request timeout)
        20, ge=0, le=10_000, description="longest the broker may hold a fetch (latency vs idle requests)"
    )
    commit_interval_ms: int = Field(200, ge=1)
    snapshot_interval_s: float = Field(10.0, gt=0.0, allow_inf_nan=False)
    entity_ttl_s: float = Field(
        3600.0, gt=0.0, allow_inf_nan=False, description="idle entities (by event time) leave memory after this"
    )
    max_live_entities: int = Field(1_000_000, ge=1)
    max_message_bytes: int = Field(65536, ge=1024, description="larger records are dead-lettered as oversize")
    max_future_s: float = Field(
        3600.0,
        gt=0.0,
        allow_inf_nan=False,
        description="an event time further than this ahead of the wall clock is dead-lettered (from_the_future): "
        "a producer with a wrong clock must not move its entity's latest event time ahead, or the entity's next "
        "real events would all be out_of_order",
    )
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=1)
    db_retry_max_s: float = Field(30.0, gt=0.0, allow_inf_nan=False)
    offset_reset: Literal["earliest", "latest", "fail"] = Field(
        "earliest",
        description="a stored position outside the broker's log (topic recreated, broker lost its "
        "log, retention): read from the log start, skip to its end, or stop; always logged as an ERROR",
    )
    dedupe_window: int = Field(
        10_000,
        ge=0,
        description="records remembered per partition for deduplication (payments: transaction id; "
        "readings: device, time and values; in its snapshotted state); a resend inside the window is dropped, "
        "not scored; 0 = off",
    )
    allowed_lateness_s: float = Field(
        60.0,
        ge=0.0,
        allow_inf_nan=False,
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
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
    ] = "INFO"
    log_json: bool = False
    sensor_channels: list[str] = Field(min_length=1, default_factory=lambda: list(SENSOR_CHANNELS))
    threshold: ThresholdKnobs = Field(
        ThresholdKnobs(), description="per-entity adaptive thresholds (PIPELINE_THRESHOLD_Z etc.; see ThresholdKnobs)"
    )
    alerts: AlertSettings = Field(default_factory=lambda: AlertSettings())

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(
                f"PIPELINE_HEARTBEAT_INTERVAL_MS ({self.heartbeat_interval_ms}) must be below "
                f"PIPELINE_SESSION_TIMEOUT_MS ({self.session_timeout_ms})"
            )
        if len(set(self.sensor_channels)) < len(self.sensor_channels):
            raise ValueError(f"PIPELINE_SENSOR_CHANNELS names a channel twice: {self.sensor_channels}")
        named = {"TRANSACTIONS": self.transactions_topic, "SENSORS": self.sensors_topic, "LABELS": self.labels_topic}
        first: dict[str, str] = {}
        for name, topic in named.items():
            if topic in first:  # one of the two streams silently won the topic
                raise ValueError(
                    f"PIPELINE_{first[topic]}_TOPIC and PIPELINE_{name}_TOPIC are both {topic!r}: give each its own"
                )
            first[topic] = name
        inputs = set(named.values())
        if self.dlq_topic in inputs or self.dlq_topic == self.alerts_topic:
            # each dead letter would be read back, fail again and be dead-lettered again, forever
            raise ValueError(
                f"PIPELINE_DLQ_TOPIC {self.dlq_topic!r} is also an input topic or the alerts topic: each dead letter "
                "would be read back, fail again and be dead-lettered again"
            )
        return self

    def read_topic_clash(self, topics: Iterable[str]) -> str | None:
        """Why a stream file's input topics cannot be served with these settings (None: they can): the
        dead-letter topic would loop, the alerts topic holds alerts, not readings (the bundled topics are
        checked above)."""
        for topic in topics:
            if topic == self.dlq_topic:
                return (
                    f"topic {topic!r} is PIPELINE_DLQ_TOPIC: each dead letter would be read back, fail again and be "
                    "dead-lettered again"
                )
            if topic == self.alerts_topic:
                return f"topic {topic!r} is PIPELINE_ALERTS_TOPIC: the service writes its alerts there"
        return None


def unknown_variables(environ: Mapping[str, str | None]) -> list[str]:
    """PIPELINE_* variables that name no setting (a typo is otherwise ignored without a word), each with the
    closest setting when there is one. environ: the process environment and the `.env` file's names."""
    known = {f"PIPELINE_{name.upper()}" for name in Settings.model_fields}
    known |= {f"PIPELINE_THRESHOLD_{f.name.upper()}" for f in dataclasses.fields(ThresholdKnobs)}
    known |= {f"PIPELINE_ALERTS_{name.upper()}" for name in AlertSettings.model_fields}
    out = []
    for name in sorted(n for n in environ if n.startswith("PIPELINE_") and n not in known):
        close = difflib.get_close_matches(name.removeprefix("PIPELINE_"), [k[9:] for k in sorted(known)], n=1)
        out.append(f"{name} (did you mean PIPELINE_{close[0]}?)" if close else name)
    return out


def settings_error(exc: ValidationError) -> str:
    """A configuration error as one line naming the environment variable (PIPELINE_THRESHOLD_Z: ...)."""
    prefix = "PIPELINE_ALERTS_" if exc.title == AlertSettings.__name__ else "PIPELINE_"
    first = exc.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"] if isinstance(part, str)]
    message = str(first["msg"]).removeprefix("Value error, ")
    given = first.get("input")
    if isinstance(given, dict):  # a nested section's own check names its field first: "smoothing must be ..."
        named = [k for k in given if isinstance(k, str) and message.startswith(f"{k} ")]
        loc += named[:1]
    if not loc:  # a check across settings: its message names them
        return message
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    if loc[0].isupper():  # read under an alias: KAFKA_BOOTSTRAP, DATABASE_URL (or their PIPELINE_ names)
        return f"{loc[0]}: {message}{shown}"
    return f"{prefix}{'_'.join(loc).upper()}: {message}{shown}"
