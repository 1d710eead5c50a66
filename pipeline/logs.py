"""Structured logging: key=value text for people, one JSON object per line for machines (--log-json)."""

from __future__ import annotations

import json
import logging
import sys
import time


class RateLimit(logging.Filter):
    """A logger's WARNING-and-above lines: each message template through once per `every_s` (a retry loop or a
    scrape that fails the same way many times says so once a minute); a traceback becomes its one line."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now, key = time.monotonic(), f"{record.name}:{record.msg}"
        if now - self._last.get(key, -self.every_s) < self.every_s:
            return False
        self._last[key] = now
        if record.exc_info and record.exc_info[1] is not None:  # a connection reset is one line, not a traceback
            exc, text = record.exc_info[1], str(record.exc_info[1]).replace("%", "%%")
            record.msg, record.exc_info, record.exc_text = f"{record.msg} ({type(exc).__name__}: {text})", None, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "INFO", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("kafka", "aiokafka", "faust", "mode", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
