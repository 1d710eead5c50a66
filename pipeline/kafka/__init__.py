"""Everything that talks to Kafka. The only package importing kafka-python."""

from pipeline.kafka.broker import TansuBroker, resolve_bootstrap
from pipeline.kafka.client import (
    KafkaDeadLetterSink,
    KafkaSource,
    ensure_topics,
    make_producer,
    produce_json,
)

__all__ = [
    "KafkaDeadLetterSink",
    "KafkaSource",
    "TansuBroker",
    "ensure_topics",
    "make_producer",
    "produce_json",
    "resolve_bootstrap",
]
