"""Synthetic sensor load for the benchmark: K pumps, 8 channels, one reading per pump per second of event
time, generated in numpy chunks and formatted straight to wire JSON (fast enough to pace 20k+/s).

Also runnable as a paced producer process: `python -m pipeline.bench.load --bootstrap B --topic T ...`.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone

import numpy as np

from pipeline.simulate import SENSOR_CHANNELS

_BASE = np.array([0.21, 0.27, 1.9, 0.25, 70.0, 25.0, 230.0, 32.0])
_AMP = np.array([0.01, 0.012, 0.15, 0.05, 1.0, 0.4, 3.0, 1.0])
_NOISE = np.array([0.002, 0.002, 0.03, 0.02, 0.15, 0.05, 0.8, 0.3])
START = 1_583_748_873.0  # 2020-03-09, like pipeline.simulate

_TEMPLATE = '{"device_id":"%s","timestamp":"%s","values":{' + ",".join(f'"{c}":%.6f' for c in SENSOR_CHANNELS) + "}}"


def device_id(d: int) -> str:
    return f"pump-{d:05d}"


class SensorLoad:
    """Event i (0-based, global) is pump i % K's reading number i // K."""

    def __init__(self, entities: int, seed: int = 0, anomalous_every: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.k = entities
        self.scale = rng.uniform(0.9, 1.1, (entities, 8))
        self.phase = rng.uniform(0, 2 * math.pi, entities)
        self.rng = rng
        self.ids = [device_id(d) for d in range(entities)]
        self.keys = [i.encode() for i in self.ids]
        self.anomalous_every = anomalous_every  # every n-th pump spikes on every 50th reading (0 = none)

    def arrays(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (pump index (n,), event time (n,), values (n, 8))"""
        i = np.arange(start, start + n)
        dev = i % self.k
        reading = i // self.k
        ts = START + reading * 1.0 + dev * 1e-4
        load = np.sin(2 * math.pi * reading / 60.0 + self.phase[dev])
        vals = _BASE * self.scale[dev] + _AMP * load[:, None] + self.rng.normal(0, 1, (n, 8)) * _NOISE
        if self.anomalous_every:
            spike = (dev % self.anomalous_every == 0) & (reading % 50 == 49)
            vals[spike, 0] += 12 * _NOISE[0]
            vals[spike, 2] += 10 * _NOISE[2]
        return dev, ts, vals

    def payloads(self, start: int, n: int) -> list[tuple[bytes, bytes]]:
        dev, ts, vals = self.arrays(start, n)
        out = []
        iso_cache: dict[int, str] = {}
        for d, t, v in zip(dev.tolist(), ts.tolist(), vals.tolist(), strict=True):
            sec = int(t)
            base = iso_cache.get(sec)
            if base is None:
                base = iso_cache[sec] = datetime.fromtimestamp(sec, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            stamp = f"{base}.{int(round((t - sec) * 1e6)):06d}Z"
            out.append((self.keys[d], (_TEMPLATE % (self.ids[d], stamp, *v)).encode()))
        return out

    def chunks(self, start: int, n: int, chunk: int = 5000) -> Iterator[list[tuple[bytes, bytes]]]:
        for s in range(start, start + n, chunk):
            yield self.payloads(s, min(chunk, start + n - s))


def produce(
    bootstrap: str,
    topic: str,
    load: SensorLoad,
    start: int,
    n: int,
    rate: float | None = None,
    duration_s: float | None = None,
    pregenerate_max: int = 2_000_000,
) -> int:
    """Send n events (or until duration_s), paced at `rate`/s if given. Record timestamp = send time.

    The load generator shares the machine with the system under test, so it is kept cheap: payloads are
    formatted before the clock starts when there are at most `pregenerate_max` of them (~3 us each; a soak
    formats them chunk by chunk instead), and records go out as pre-encoded record batches, one request
    per chunk (pipeline.kafka.batch_producer), instead of kafka-python's ~30 us per-record send().
    """
    from pipeline.kafka.batch_producer import BatchProducer

    producer = BatchProducer(bootstrap, topic)
    step = 500 if rate else 5000
    chunks: Iterable[list[tuple[bytes, bytes]]] = load.chunks(start, n, step)
    if duration_s is None and n <= pregenerate_max:
        chunks = list(chunks)
        gc.collect()
        gc.freeze()  # the payload tuples are long-lived: keep the collector from re-scanning them
    sent = 0
    t0 = time.monotonic()
    try:
        for batch in chunks:
            producer.send(batch)
            sent += len(batch)
            if rate:
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            if duration_s is not None and time.monotonic() - t0 >= duration_s:
                break
    finally:
        producer.close()
    return sent


def main() -> None:
    ap = argparse.ArgumentParser(description="paced synthetic sensor producer (benchmark load)")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--entities", type=int, default=10000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--events", type=int, default=10**12)
    ap.add_argument("--rate", type=float, default=None)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    n = produce(a.bootstrap, a.topic, SensorLoad(a.entities, a.seed), a.start, a.events, a.rate, a.duration)
    print(n, flush=True)


if __name__ == "__main__":
    main()
