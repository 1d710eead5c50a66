"""Helpers for tests that run `pipeline run` as a real subprocess against the real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from pipeline.kafka.client import ensure_topics, make_producer, produce_json
from pipeline.kafka.client import read_topic as kafka_read_topic

REPO = Path(__file__).resolve().parents[1]


def topic_env(prefix: str, bootstrap: str, database_url: str, **extra: Any) -> dict[str, str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": bootstrap,
        "DATABASE_URL": database_url,
        "PIPELINE_TRANSACTIONS_TOPIC": f"{prefix}-transactions",
        "PIPELINE_SENSORS_TOPIC": f"{prefix}-sensors",
        "PIPELINE_DLQ_TOPIC": f"{prefix}-dlq",
        "PIPELINE_ALERTS_TOPIC": f"{prefix}-alerts",
        "PIPELINE_GROUP_ID": f"{prefix}-group",
        "PIPELINE_TORCH_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.update({f"PIPELINE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def produce(bootstrap: str, topic: str, records: Iterable[tuple[str | None, Any]], partitions: int = 4) -> int:
    ensure_topics(bootstrap, [topic], partitions)
    producer = make_producer(bootstrap)
    try:
        return produce_json(producer, topic, records)
    finally:
        producer.close()


def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, dict[str, Any]]]:
    return [(r.key, orjson.loads(r.value)) for r in kafka_read_topic(bootstrap, topic) if r.value]


def start_processor(env: dict[str, str], *args: str, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    with open(log_path or os.devnull, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", *args], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )


def stop_processor(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM, as an orchestrator stops the service; killed if it has not exited within `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_processor(env: dict[str, str], *args: str, timeout: float = 240, log_path: Path | None = None) -> None:
    proc = start_processor(env, "--idle-exit", "3", *args, log_path=log_path)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if rc != 0:
        tail = log_path.read_text()[-3000:] if log_path else ""
        raise AssertionError(f"processor exited with {rc}\n{tail}")


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline ARGS` to completion, text output captured; env defaults to this process's plus a wide
    terminal, so a one-line error stays one line."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env={**os.environ, "COLUMNS": "300"} if env is None else env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
