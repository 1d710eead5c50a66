"""Helpers for the recovery tests: a TCP proxy that cuts and restores the database connection, and
the database facts several recovery tests compare (incidents, outbox, score samples, offsets, entity states)."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import make_url

from pipeline.kafka.broker import free_port
from pipeline.state.store import saved_layout
from tests.sql_helpers import SqlTestStore


class TcpProxy:
    """127.0.0.1:<port> -> target. `cut()` closes the listener and every live connection (clients see the
    server vanish; new connections are refused); `restore()` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return self

    restore = start

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()

    def cut(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
            self._listener.close()
            self._listener = None
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._close(s)

    close = cut


def proxied_url(url: str, proxy: TcpProxy) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def db_target(url: str) -> tuple[str, int]:
    u = make_url(url)
    return u.host or "127.0.0.1", u.port or 5432


def incidents_of(db: SqlTestStore, run_id: str) -> set[tuple[Any, ...]]:
    """Incidents without ids, run-specific keys or wall-clock columns."""
    with db.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT entity_id, source_partition, status, severity, opened_at, last_alert_at, resolved_at, "
                "alert_count, seq FROM incidents WHERE run_id = :r"
            ),
            {"r": run_id},
        ).all()
    return {tuple(r) for r in rows}


def outbox_of(db: SqlTestStore, run_id: str) -> list[tuple[str, str, str | None]]:
    """(message id without the run id, event, resolved_at) per outbox row, sorted."""
    import orjson

    out = []
    for r in db.outbox_rows(run_id):
        inc = orjson.loads(r["payload"])["incident"]
        out.append((r["message_id"].split("|", 1)[1], inc["event"], inc["resolved_at"]))
    return sorted(out)


def samples_of(db: SqlTestStore, run_id: str) -> list[tuple[Any, ...]]:
    """(stream, entity, event time, is_anomaly, score) per score sample, sorted (a multiset: extras show)."""
    with db.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT stream, entity_id, event_time, is_anomaly, score FROM score_samples WHERE run_id = :r"),
            {"r": run_id},
        ).all()
    return sorted(tuple(r) for r in rows)


def same_samples(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]], rel: float = 1e-4) -> bool:
    return len(a) == len(b) and all(
        x[:4] == y[:4] and abs(x[4] - y[4]) <= rel * max(1.0, abs(y[4])) for x, y in zip(a, b, strict=True)
    )


def dead_letters_of(bootstrap: str, topic: str) -> list[tuple[str, int, int, str]]:
    """(source topic, partition, offset, reason) per dead-letter record, sorted (duplicates show)."""
    import orjson

    from pipeline.kafka.client import read_topic

    out = []
    for r in read_topic(bootstrap, topic):
        env = orjson.loads(r.value or b"{}")
        src = env["source"]
        out.append((src["topic"], src["partition"], src["offset"], env["reason"]))
    return sorted(out)


class OffsetWatch:
    """Samples partition_checkpoints of one run every `every` s in a thread: the committed offset of each
    partition must never decrease."""

    def __init__(self, db: SqlTestStore, run_id: str, every: float = 0.02) -> None:
        self.db, self.run_id, self.every = db, run_id, every
        self.backwards: list[tuple[Any, int, int]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._last: dict[Any, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with self.db.engine.connect() as conn:
                    rows = conn.execute(
                        text("SELECT topic, partition, committed_offset FROM partition_checkpoints WHERE run_id = :r"),
                        {"r": self.run_id},
                    ).all()
            except Exception:  # noqa: BLE001, S112 - a database cut reads as "no sample"
                continue
            self.samples += 1
            for t, p, c in rows:
                last = self._last.get((t, p))
                if last is not None and c < last:
                    self.backwards.append(((t, p), last, c))
                self._last[(t, p)] = c

    def start(self) -> OffsetWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def outbox_events_of(db: SqlTestStore, run_id: str) -> list[tuple[Any, ...]]:
    """(entity, event, seq, opened_at, resolved_at) per outbox message, sorted: comparable across runs whose
    source offsets differ (a run that read a restarted broker's log)."""
    import orjson

    out = []
    for r in db.outbox_rows(run_id):
        inc = orjson.loads(r["payload"])["incident"]
        out.append((r["entity_id"], inc["event"], inc["seq"], inc["opened_at"], inc["resolved_at"]))
    return sorted(out)


def alert_events_of(db: SqlTestStore, run_id: str) -> dict[tuple[str, str, Any], float]:
    """{(stream, entity, event time): score}; a duplicate alert for one event fails the assertion."""
    alerts = db.list_alerts(run_id=run_id)
    out = {(a["stream"], a["entity_id"], a["event_time"]): a["score"] for a in alerts}
    assert len(out) == len(alerts), "two alerts for one event"
    return out


def entity_states_of(db: SqlTestStore, run_id: str) -> dict[tuple[str, str], bytes]:
    """{(stream, entity id): state record} of a run, the per-partition rows ('#...') left out."""
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT stream, entity_id, state FROM entity_state WHERE run_id = :r"), {"r": run_id})
        return {(r.stream, r.entity_id): bytes(r.state) for r in rows if not r.entity_id.startswith("#")}


def assert_same_entity_states(db: SqlTestStore, ref_run: str, got_run: str) -> None:
    """Every entity's saved state equals the uninterrupted run's: the same events applied once each (count),
    the same window, scaling and score statistics."""
    ref, got = entity_states_of(db, ref_run), entity_states_of(db, got_run)
    assert ref and set(ref) == set(got), f"entities differ: {sorted(set(ref) ^ set(got))[:4]}"
    counts = []
    for key, blob in ref.items():
        version, layout = saved_layout(blob, key[1])
        dt = layout.dtype_of(version)
        ra, rb = np.frombuffer(blob, dt)[0], np.frombuffer(got[key], dt)[0]
        if ra["count"] != rb["count"]:
            counts.append((key, int(ra["count"]), int(rb["count"])))
            continue
        np.testing.assert_allclose(ra["win"], rb["win"], rtol=1e-6, err_msg=str(key))
        np.testing.assert_allclose(ra["feat_mean"], rb["feat_mean"], rtol=1e-9, err_msg=str(key))
        np.testing.assert_allclose(ra["score_mean"], rb["score_mean"], rtol=1e-5, atol=1e-8, err_msg=str(key))
    assert not counts, f"{len(counts)} entities applied other events (entity, reference count, count): {counts[:4]}"
