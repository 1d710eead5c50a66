"""One exception tree: every error the service raises on purpose derives from PipelineError."""


class PipelineError(Exception):
    """Base of all pipeline errors."""


class ConfigError(PipelineError):
    """Bad configuration or CLI input; the message says what to change."""


class DecodeError(PipelineError):
    """A record could not be decoded or validated; `reason` goes on the dead-letter record."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StateError(PipelineError):
    """Entity state could not be restored as saved (layout mismatch, corrupt blob)."""


class ScoringError(PipelineError):
    """A model could not be loaded or applied."""


class SinkError(PipelineError):
    """An output (database, dead-letter topic) could not be made durable."""


class BrokerError(PipelineError):
    """The Kafka broker could not be reached, started or administered."""


class CheckpointError(PipelineError):
    """A checkpoint (flush sinks, then commit offsets) failed; offsets were not committed."""


class NotFoundError(PipelineError):
    """A requested alert or incident does not exist."""


class OffsetResetError(PipelineError):
    """A stored position lies outside the broker's log and PIPELINE_OFFSET_RESET=fail."""
