"""Replay: run the unchanged Processor over a historical range of a topic, in an isolated namespace.

Isolation: the source is a manually assigned consumer (no consumer group, nothing committed to Kafka),
state/offsets/alerts are keyed by the replay's own run id, and dead letters are counted, never
produced. Determinism: the processor's batched scoring equals one-at-a-time scoring, so the same
range and model give the same alerts whatever the batching, and a replay from offset 0 of what the
live processor saw reproduces the live run's alerts. Exception: with a transactions model that reads
label feedback, the labels topic's range is replayed alongside, and a label reaches the payments processed
after it was read (never one before its `labelled_at`), so it can take effect a little later than it did
live; the replay's alerts can then differ from the live run's near labels.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from models.lstm_ae import Checkpoint, bundled_checkpoint_path
from models.lstm_forecast import ForecastCheckpoint, load_model
from pipeline.app import ensure_models, options_from, stream_scorer
from pipeline.checkpointing.rows import REPLAY_GROUP
from pipeline.config import Settings, check_run_id
from pipeline.errors import ConfigError
from pipeline.features.streams import TransactionStream
from pipeline.kafka.replay_source import ReplaySource, SeekMode
from pipeline.processor import Processor
from pipeline.records import RawRecord
from pipeline.registry import ModelRegistry
from pipeline.scoring.factory import build_scorer
from pipeline.scoring.scorer import StreamScorer
from pipeline.sinks import AlertQueries, Database, SqlCheckpointStore, SqlRegistryStore
from pipeline.state.store import saved_layout
from pipeline.streams import serving
from pipeline.streams.config import ModelRef, Stream, load_streams, parse_model_ref

log = logging.getLogger(__name__)


def parse_time(value: str) -> int:
    """ISO-8601 (a bare date or naive time means UTC) or epoch milliseconds -> epoch milliseconds."""
    v = value.strip()
    if v.isdigit():
        return int(v)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"not an ISO time or epoch milliseconds: {value!r}") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(round(dt.timestamp() * 1000))


def check_range(from_ms: int | None, to_ms: int | None) -> None:
    if from_ms is not None and to_ms is not None and to_ms <= from_ms:
        raise ConfigError("--to must be after --from")


def parse_range(from_time: str | None, to_time: str | None) -> tuple[int | None, int | None]:
    """--from / --to (either may be absent) -> epoch milliseconds, checked before anything starts."""
    from_ms = parse_time(from_time) if from_time else None
    to_ms = parse_time(to_time) if to_time else None
    check_range(from_ms, to_ms)
    return from_ms, to_ms


def default_run_id() -> str:
    now = datetime.now(timezone.utc)
    return f"replay-{now:%Y%m%dT%H%M%S}-{now.microsecond // 1000:03d}Z"


def resolve_model(spec: str, settings: Settings) -> Checkpoint | ForecastCheckpoint:
    """A checkpoint (either family) by file path, or by card version (or card name) among the models directories."""
    path = Path(spec)
    if path.suffix == ".pt" or path.exists():
        if not path.exists():
            raise ConfigError(f"no model checkpoint at {path}")
        return load_model(path)
    dirs = [d for d in (settings.models_dir, bundled_checkpoint_path("sensors").parent) if d is not None]
    seen: list[str] = []
    for d in dirs:
        for card_path in sorted(Path(d).glob("*.card.json")):
            card = json.loads(card_path.read_text())
            seen.append(str(card.get("version")))
            if spec in (card.get("version"), card.get("name")):
                pt = card_path.with_name(card_path.name.removesuffix(".card.json") + ".pt")
                return load_model(pt)
    raise ConfigError(f"no model version {spec!r} in {', '.join(map(str, dirs))} (have: {', '.join(seen)})")


class CountingDeadLetters:
    """A replay never writes the live dead-letter topic: it counts reasons instead."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()

    def send(self, record: RawRecord, reason: str, detail: str) -> None:
        self.reasons[reason] += 1

    def flush(self) -> None:
        pass


@dataclass
class ReplayResult:
    run_id: str
    topics: list[str]
    model_versions: dict[str, str]
    events: int
    scored: int
    alerts: int
    dead_letters: dict[str, int]
    out_of_range: int
    seconds: float
    from_ms: int | None = None
    to_ms: int | None = None
    end_offsets: dict[str, int] = field(default_factory=dict)
    # the run id had scored part of these topics before: this invocation went on from its durable positions
    resumed: bool = False
    duplicates: int = 0  # payments dropped as resends (same transaction_id inside the dedupe window)
    rebuilt: int = 0  # a resumed run: records scored again to rebuild state from its snapshot (not in `scored`)

    @property
    def all_dead_lettered(self) -> bool:
        """Records were read and not one was scored: the topic does not carry what the stream's model reads
        (a wrong --stream, or a topic of another layout); `pipeline replay` exits 1."""
        return self.scored == 0 and self.rebuilt == 0 and sum(self.dead_letters.values()) > 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["events_per_s"] = round(self.events_per_s, 1)
        return d


class _ProgressSource:
    """Wraps the replay source to drive a progress callback (consumed offsets, total) between polls."""

    def __init__(self, inner: ReplaySource, progress: Callable[[int, int], None], every_s: float = 0.25) -> None:
        self.inner, self.progress, self.every_s = inner, progress, every_s
        self._last = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        out = self.inner.poll(timeout_ms, max_records)
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            total = self.inner.total()
            lag = self.inner.lag() or 0
            self.progress(total - lag, total)
        return out


def scorers_for(
    settings: Settings, topics: Sequence[str], stream: str | None, model: str | None, db: Database | None = None
) -> dict[str, StreamScorer]:
    """topic -> scorer, built as the live service builds its scorers: from the stream file where
    PIPELINE_STREAMS_FILE names one (`declared_scorers`), else the bundled streams (app.build_scorers)."""
    if settings.streams_file is not None:
        if db is None:
            raise ConfigError("a replay of declared streams needs the database (model registry)")
        return declared_scorers(settings, settings.streams_file, topics, stream, model, db)
    by_topic = {settings.transactions_topic: "transactions", settings.sensors_topic: "sensors"}
    checkpoint = resolve_model(model, settings) if model else None
    if stream is not None and stream not in ("transactions", "sensors"):
        raise ConfigError(
            f"--stream {stream!r}: without a stream file (PIPELINE_STREAMS_FILE) a replay serves the bundled "
            "streams, transactions or sensors"
        )
    card_stream = checkpoint.card.get("stream") if checkpoint else None
    wanted: dict[str, str] = {}
    for t in topics:
        s = stream or by_topic.get(t) or card_stream
        if s not in ("transactions", "sensors"):
            raise ConfigError(f"cannot tell which stream topic {t!r} carries: pass --stream transactions|sensors")
        if card_stream is not None and card_stream != s:  # it would score nothing (or be silently ignored)
            why = "--stream says" if stream else f"topic {t!r} is the {s} topic (PIPELINE_{s.upper()}_TOPIC), so"
            raise ConfigError(f"--model {model} is a {card_stream} model; {why} {s}: replay a {s} model")
        wanted[t] = str(s)
    ckpts = ensure_models(settings)
    if checkpoint is not None:
        ckpts[str(card_stream or next(iter(wanted.values())))] = checkpoint
    return {
        t: build_scorer(
            s,
            ckpts[s],
            channels=settings.sensor_channels,
            knobs=settings.threshold,
            device=settings.device,
            precision=settings.precision,
            allowed_lateness_s=settings.allowed_lateness_s,
            max_message_bytes=settings.max_message_bytes,
        )
        for t, s in wanted.items()
    }


def declared_scorers(
    settings: Settings,
    where: Path,
    topics: Sequence[str],
    stream: str | None,
    model: str | None,
    db: Database,
) -> dict[str, StreamScorer]:
    """topic -> scorer of the streams of the stream file `where`, as `pipeline run` serves them: each topic's
    declared stream (or the stream `stream` names, e.g. to replay an archive topic), with its model, or with
    `model` in the stream file's syntax (a registry version or NAME@ALIAS, a .pt file, bundled:KIND): a candidate
    version is replayed over history before it is promoted. A model whose channels differ is refused as at
    start."""
    declared = load_streams(where).streams
    by_name, by_topic = {s.name: s for s in declared}, {s.topic: s for s in declared}
    if stream is not None and stream not in by_name:
        raise ConfigError(f"--stream {stream!r} is not declared in {where} (have: {', '.join(by_name)})")
    candidate = None
    if model is not None:
        try:
            candidate = parse_model_ref(model)
        except ValueError as exc:
            raise ConfigError(f"--model {exc}") from None
    registry = ModelRegistry(SqlRegistryStore(db))
    out: dict[str, StreamScorer] = {}
    for t in topics:
        declared_stream = by_name[stream] if stream is not None else by_topic.get(t)
        if declared_stream is None:
            raise ConfigError(
                f"topic {t!r} is not a declared stream's topic in {where}: pass --stream NAME "
                f"(one of {', '.join(by_name)})"
            )
        if candidate is not None:
            check_candidate_stream(model or "", candidate, declared_stream)
            declared_stream = declared_stream.model_copy(update={"model": model})
        served = serving.ServedStream(declared_stream, serving.resolve_model(declared_stream, registry))
        out[t] = stream_scorer(settings, served)
    return out


def check_candidate_stream(text: str, candidate: ModelRef, stream: Stream) -> None:
    """A registry version replayed as a stream's candidate must be one `models promote` could make its
    champion: registered under the name the stream's model has in the registry (the stream's own name when its
    model is a file)."""
    if candidate.source != "registry":
        return
    own = stream.model_ref
    serves = own.name if own.source == "registry" else stream.name
    if candidate.name != serves:
        raise ConfigError(
            f"--model {text} is a version of {candidate.name!r}, and stream {stream.name!r} serves {serves!r} "
            f"models (its model: {stream.model}): replay a version of {serves!r}, or pass --stream NAME"
        )


def run_replay(
    settings: Settings,
    bootstrap: str,
    topics: Sequence[str],
    *,
    from_ms: int | None = None,
    to_ms: int | None = None,
    model: str | None = None,
    stream: str | None = None,
    run_id: str | None = None,
    seek_mode: SeekMode = "auto",
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    db: Database | None = None,
) -> ReplayResult:
    check_range(from_ms, to_ms)
    run_id = run_id or default_run_id()
    if run_id == settings.run_id:
        raise ConfigError(f"run id {run_id!r} is the live run's namespace; pick another")
    try:
        check_run_id(run_id)
    except ValueError as exc:
        raise ConfigError(f"--run-id {run_id!r}: {exc}") from None
    own_db = db is None
    database = db or Database(settings.database_url)
    if own_db:
        database.create_schema()
    try:
        services = SqlCheckpointStore(database).position_groups(run_id) - {REPLAY_GROUP}
        if services:  # another shell's PIPELINE_RUN_ID: its entity state would be overwritten
            raise ConfigError(
                f"run id {run_id!r} is a service's run (consumer group {sorted(services)[0]!r}): a replay into it "
                "would overwrite its entity state; pick another --run-id"
            )
        scorers = scorers_for(settings, topics, stream, model, database)
        # a transactions model that reads label feedback replays the labels topic's same range alongside
        fed = [t for t, sc in scorers.items() if isinstance(sc.spec, TransactionStream) and sc.spec.label_feedback]
        labels = {settings.labels_topic: fed[0]} if fed else {}
        if len(fed) > 1 or (fed and settings.labels_topic in topics):
            raise ConfigError(
                "label feedback: replay one transactions topic at a time; its labels come from "
                f"PIPELINE_LABELS_TOPIC ({settings.labels_topic})"
            )
        resumed = check_resumable(SqlCheckpointStore(database), run_id, scorers)
    except BaseException:
        if own_db:
            database.dispose()
        raise
    source = ReplaySource(bootstrap, from_ms=from_ms, to_ms=to_ms, seek_mode=seek_mode)
    dlq = CountingDeadLetters()
    opts = options_from(settings)
    opts.run_id, opts.group_id = run_id, REPLAY_GROUP
    src: Any = _ProgressSource(source, progress) if progress is not None else source
    processor = Processor(src, SqlCheckpointStore(database), dlq, scorers, opts, label_topics=labels)
    started = time.monotonic()
    try:
        stats = processor.run(stop or threading.Event(), idle_exit_s=0.0)
        if progress is not None:
            progress(source.total(), source.total())
    finally:
        source.close()
        if own_db:
            database.dispose()
    return ReplayResult(
        run_id=run_id,
        topics=[*topics, *labels],
        model_versions={t: s.model_version for t, s in scorers.items()},
        events=stats.events,
        scored=stats.scored,
        alerts=stats.alerts,
        dead_letters=dict(dlq.reasons),
        out_of_range=source.out_of_range,
        seconds=time.monotonic() - started,
        from_ms=from_ms,
        to_ms=to_ms,
        end_offsets={f"{t}[{p}]": o for (t, p), o in sorted(source.end.items())},
        resumed=resumed,
        duplicates=stats.duplicates,
        rebuilt=stats.rebuilt,
    )


def check_resumable(store: SqlCheckpointStore, run_id: str, scorers: Mapping[str, StreamScorer]) -> bool:
    """Whether the run id already holds durable positions on these topics (the replay goes on from them).
    A run another model version scored is refused: going on from its positions with this model would score
    only what that run had not reached, and summarise an unchanged range as "0 events"."""
    offsets = store.load_offsets(run_id, REPLAY_GROUP)
    resumed = {t for t, _ in offsets} & set(scorers)
    for topic in sorted(resumed):
        scorer = scorers[topic]
        saved = store.any_state(run_id, scorer.spec.name)
        if saved is None:
            snapshotted = any(snap is not None for (t, _), (_, snap) in offsets.items() if t == topic)
            if snapshotted:  # it took a state snapshot of a topic whose records it never scored
                raise ConfigError(
                    f"run {run_id!r} read {topic} up to its positions without scoring any of it (every record "
                    "dead-lettered?): going on from there would score nothing; pass a new --run-id"
                )
            continue
        model = saved_layout(saved[1], saved[0])[1].model
        if model not in (0, scorer.store.layout.model):
            raise ConfigError(
                f"run {run_id!r} already replayed {topic} with another model version than "
                f"{scorer.model_version}: pass a new --run-id to score the range with it (the same run id goes "
                "on from where that run stopped, with the model that run used)"
            )
    return bool(resumed)


AlertKey = tuple[str, str, str, int, int]  # stream, entity, topic, partition, offset


def shared_topics(store: SqlCheckpointStore, run_a: str, run_b: str) -> tuple[set[str] | None, set[str]]:
    """The topics both runs read (None when a run has no positions to tell: compare everything) and those only
    one of them read: a what-if replay of one topic would otherwise show the live run's other streams' alerts
    as "removed"."""
    read_a, read_b = store.run_topics(run_a), store.run_topics(run_b)
    if not read_a or not read_b:
        return None, set()
    return read_a & read_b, read_a ^ read_b


def alert_key(a: Mapping[str, Any]) -> AlertKey:
    return (a["stream"], a["entity_id"], a["source_topic"], int(a["source_partition"]), int(a["source_offset"]))


def diff_runs(
    db: AlertQueries, run_a: str, run_b: str, *, show: int = 20, topics: Collection[str] | None = None
) -> dict[str, Any]:
    """Alerts added/removed from run A to run B, keyed by (stream, entity, source position). topics: compare only
    alerts of these source topics (None: all)."""

    def alerts_of(run: str) -> dict[AlertKey, dict[str, Any]]:
        rows = db.list_alerts(run_id=run)
        return {alert_key(r): r for r in rows if topics is None or r["source_topic"] in topics}

    a, b = alerts_of(run_a), alerts_of(run_b)
    added, removed, common = sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys()), a.keys() & b.keys()
    deltas = [b[k]["score"] - a[k]["score"] for k in common]
    by_stream: dict[str, dict[str, int]] = {}
    for name, keys in (("added", added), ("removed", removed), ("common", list(common))):
        for k in keys:
            by_stream.setdefault(k[0], {"added": 0, "removed": 0, "common": 0})[name] += 1

    def brief(r: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "stream": r["stream"],
            "entity_id": r["entity_id"],
            "event_time": str(r["event_time"]),
            "score": round(float(r["score"]), 4),
            "threshold": round(float(r["threshold"]), 4),
            "model_version": r["model_version"],
            "source": f"{r['source_topic']}[{r['source_partition']}]@{r['source_offset']}",
        }

    def entities(keys: Sequence[AlertKey]) -> int:
        return len({(k[0], k[1]) for k in keys})

    return {
        "run_a": run_a,
        "run_b": run_b,
        "topics": None if topics is None else sorted(topics),
        "alerts_a": len(a),
        "alerts_b": len(b),
        "added": len(added),
        "removed": len(removed),
        "common": len(common),
        "entities_added": entities(added),
        "entities_removed": entities(removed),
        "mean_abs_score_change_common": (sum(abs(d) for d in deltas) / len(deltas)) if deltas else 0.0,
        "models_a": sorted({r["model_version"] for r in a.values()}),
        "models_b": sorted({r["model_version"] for r in b.values()}),
        "by_stream": by_stream,
        "added_examples": [brief(b[k]) for k in added[:show]],
        "removed_examples": [brief(a[k]) for k in removed[:show]],
    }
