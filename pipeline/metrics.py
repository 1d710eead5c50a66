"""Prometheus metrics of the processor (served by `pipeline run --metrics-port` and the HTTP API)."""

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from pipeline.errors import PipelineError
from pipeline.logs import RateLimit

log = logging.getLogger(__name__)
log.addFilter(RateLimit(60.0))  # the database-down line below comes with every scrape while it lasts

EVENTS = Counter("pipeline_events_total", "Events consumed", ["stream"])
SCORED = Counter("pipeline_events_scored_total", "Events scored", ["stream"])
DLQ = Counter("pipeline_dead_letters_total", "Records sent to the dead-letter topic", ["topic", "reason"])
DUPLICATES = Counter(
    "pipeline_duplicates_total",
    "Resends dropped: the record's dedupe key (a payment's transaction_id, a reading's device, time and values) "
    "already in the partition's dedupe window (PIPELINE_DEDUPE_WINDOW)",
    ["stream"],
)
LATE_EVENTS = Counter(
    "pipeline_late_events_total",
    "Events behind their entity by at most PIPELINE_ALLOWED_LATENESS_S: scored without updating the entity's state",
    ["stream"],
)
ALERTS = Counter("pipeline_alerts_total", "Alerts made durable", ["stream"])
LIVE_ENTITIES = Gauge("pipeline_live_entities", "Entities with state in memory", ["stream"])
LAG = Gauge("pipeline_consumer_lag", "Records behind the high watermark, all assigned partitions")
BATCH_FILL = Histogram(
    "pipeline_batch_size", "Events per scored micro-batch", buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000)
)
CHECKPOINT_SECONDS = Histogram("pipeline_checkpoint_seconds", "Time to flush sinks and commit")
DB_FAILURES = Counter("pipeline_db_failures_total", "Checkpoint attempts that failed on the database")
INCIDENT_EVENTS = Counter("pipeline_incident_events_total", "Incident notifications made durable", ["event"])
OUTBOX_PUBLISHED = Counter("pipeline_alerts_topic_published_total", "Outbox messages published to the alerts topic")
OUTBOX_FAILURES = Counter("pipeline_alerts_topic_failures_total", "Failed attempts to drain the alerts outbox")
OPEN_INCIDENTS = Gauge("pipeline_open_incidents", "Open incidents in the alert database")
OUTBOX_BACKLOG = Gauge("pipeline_alerts_outbox_unpublished", "Alerts-topic messages not yet published")
DATABASE_GAUGES = ["pipeline_open_incidents", "pipeline_alerts_outbox_unpublished"]  # all a standalone API knows
OFFSET_RESETS = Counter(
    "pipeline_offset_resets_total",
    "Stored positions found outside the broker's log (then PIPELINE_OFFSET_RESET applies)",
    ["topic", "reason"],
)
STATE_RECORDS_LOST = Counter(
    "pipeline_state_records_lost_total",
    "Records a log reset took while their partition's state was still replaying from its snapshot",
    ["topic"],
)
STOPPED_PARTITIONS = Gauge(
    "pipeline_partitions_stopped",
    "Partitions stopped on a batch whose compression codec this install cannot decode (see the ERROR log line)",
)
SHADOW_SCORED = Counter("pipeline_shadow_scored_total", "Events a challenger model scored in shadow", ["stream"])
SHADOW_ALERTS = Counter(
    "pipeline_shadow_alerts_total", "Would-be alerts of a challenger model (shadow_alerts; never incidents)", ["stream"]
)
SHADOW_ERRORS = Counter(
    "pipeline_shadow_errors_total",
    "Batches the challenger model failed on (logged; the champion's path is unaffected, nothing dead-lettered)",
    ["stream"],
)
SCORE_PSI = Gauge(
    "pipeline_score_psi",
    "PSI of the champion's recent scores (warm entities) against the held-out score quantiles of its model card",
    ["stream"],
)
WARMING_SHARE = Gauge(
    "pipeline_warming_share", "Share of live entities with fewer events than min_history (no alert yet)", ["stream"]
)
INPUT_PSI = Gauge(
    "pipeline_input_psi",
    "PSI of a channel's recent inputs against the quantiles in the model card's channel_stats",
    ["stream", "channel"],
)
MODEL_SWAPS = Counter(
    "pipeline_model_swaps_total",
    "Promoted model versions a running stream switched to (applied) or refused (see the ERROR log line)",
    ["stream", "result"],
)


def lifecycle_values(read: Callable[[], Mapping[str, int]]) -> tuple[float, float]:
    """(open incidents, unpublished outbox messages) from the alert database; NaN for both while it is down:
    the process's own counters still render."""
    try:
        stats = read()
    except PipelineError as exc:
        log.warning(  # rate-limited (the filter on `log`): one line a minute, not one per scrape
            "open incidents and outbox backlog unknown (next notice in a minute at the earliest): %s",
            str(exc).splitlines()[0],
        )
        return math.nan, math.nan
    return float(stats["open_incidents"]), float(stats["outbox_unpublished"])


def read_lifecycle_at_scrape(
    read: Callable[[], Mapping[str, int]], ttl_s: float = 1.0, gauges: tuple[Gauge, Gauge] | None = None
) -> None:
    """OPEN_INCIDENTS and OUTBOX_BACKLOG come from the alert database, so they are read when scraped (one read
    per scrape serves both). `pipeline run --metrics-port` wires them here; without it they were only set by
    the API's /metrics (per request: it may serve another run's view) and read 0 on the service's endpoint."""
    lock = threading.Lock()
    cache: dict[str, Any] = {"at": -math.inf, "values": (math.nan, math.nan)}

    def value(i: int) -> float:
        with lock:
            if time.monotonic() - cache["at"] > ttl_s:
                cache["values"] = lifecycle_values(read)
                cache["at"] = time.monotonic()
            return float(cache["values"][i])

    incidents, backlog = gauges or (OPEN_INCIDENTS, OUTBOX_BACKLOG)
    incidents.set_function(lambda: value(0))
    backlog.set_function(lambda: value(1))
