"""Synthetic payment and sensor streams with optional injected anomalies (demo, tests, bench).

Records are plain dicts in the wire format of schemas/; `label` marks injected anomalies and is
stripped before producing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from pipeline.config import SENSOR_CHANNELS as _BUNDLED

SENSOR_CHANNELS = list(_BUNDLED)
_CH_BASE = np.array([0.21, 0.27, 1.9, 0.25, 70.0, 25.0, 230.0, 32.0])
_CH_AMP = np.array([0.01, 0.012, 0.15, 0.05, 1.0, 0.4, 3.0, 1.0])
_CH_NOISE = np.array([0.002, 0.002, 0.03, 0.02, 0.15, 0.05, 0.8, 0.3])


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Injected:
    """Which entities get anomalies, and from which of their events on."""

    entities: dict[str, int] = field(default_factory=dict)  # entity -> index of first anomalous event


def simulate_transactions(
    n_customers: int = 200,
    events_per_customer: int = 60,
    *,
    seed: int = 0,
    start: float = 1_522_540_800.0,  # 2018-04-01
    burst_customers: int = 0,
    burst_len: int = 5,
    burst_factor: float = 12.0,
) -> tuple[list[dict], Injected]:
    rng = np.random.default_rng(seed)
    mu = rng.normal(3.3, 0.5, n_customers)
    sigma = rng.uniform(0.15, 0.35, n_customers)
    rate = rng.uniform(1.0, 4.0, n_customers)  # payments per day
    terminals = rng.integers(0, max(10, n_customers // 2), (n_customers, 5))
    injected = Injected()
    out: list[tuple[float, dict]] = []
    for c in range(n_customers):
        cid = f"C{c:06d}"
        gaps = rng.exponential(86400.0 / rate[c], events_per_customer)
        ts = start + np.cumsum(gaps)
        # daytime bias: pull timestamps towards 8:00-22:00
        ts = ts - (ts % 86400.0) + 28800.0 + (ts % 86400.0) * (50400.0 / 86400.0)
        amounts = np.exp(rng.normal(mu[c], sigma[c], events_per_customer))
        if c < burst_customers:
            first = events_per_customer - burst_len
            amounts[first:] *= burst_factor
            injected.entities[cid] = first
        for i in range(events_per_customer):
            out.append(
                (
                    float(ts[i]),
                    {
                        "transaction_id": f"T{c:06d}-{i:05d}",
                        "customer_id": cid,
                        "terminal_id": f"TERM{int(terminals[c, i % 5]):05d}",
                        "amount": round(float(amounts[i]), 2),
                        "timestamp": iso(float(ts[i])),
                        "label": int(c < burst_customers and i >= events_per_customer - burst_len),
                    },
                )
            )
    out.sort(key=lambda t: t[0])
    return [r for _, r in out], injected


def simulate_sensors(
    n_devices: int = 20,
    readings_per_device: int = 300,
    *,
    seed: int = 1,
    start: float = 1_583_748_873.0,  # 2020-03-09
    period_s: float = 1.0,
    spike_devices: int = 0,
    drift_devices: int = 0,
    anomaly_len: int = 20,
) -> tuple[list[dict], Injected]:
    rng = np.random.default_rng(seed)
    injected = Injected()
    out: list[tuple[float, dict]] = []
    t = np.arange(readings_per_device)
    for d in range(n_devices):
        did = f"pump-{d:04d}"
        phase = rng.uniform(0, 2 * math.pi, 8)
        scale = rng.uniform(0.9, 1.1, 8)
        load = np.sin(2 * math.pi * t / 60.0 + phase[0])  # shared load cycle couples the channels
        x = _CH_BASE * scale + _CH_AMP * load[:, None] + rng.normal(0, 1, (readings_per_device, 8)) * _CH_NOISE
        x[:, 4] += 0.02 * np.sin(2 * math.pi * t / 600.0 + phase[4])
        label = np.zeros(readings_per_device, int)
        first = readings_per_device - anomaly_len
        if d < spike_devices:
            x[first:, 0] += 12 * _CH_NOISE[0]  # vibration jumps
            x[first:, 2] += 10 * _CH_NOISE[2]  # current jumps
            label[first:] = 1
            injected.entities[did] = first
        elif d < spike_devices + drift_devices:
            ramp = np.linspace(0, 1, anomaly_len)
            x[first:, 3] += ramp * 15 * _CH_NOISE[3]  # pressure drifts away
            x[first:, 7] -= ramp * 15 * _CH_NOISE[7]
            label[first:] = 1
            injected.entities[did] = first
        for i in range(readings_per_device):
            ts = start + i * period_s + d * 1e-3
            out.append(
                (
                    ts,
                    {
                        "device_id": did,
                        "timestamp": iso(ts),
                        "values": {ch: float(round(x[i, k], 6)) for k, ch in enumerate(SENSOR_CHANNELS)},
                        "label": int(label[i]),
                    },
                )
            )
    out.sort(key=lambda t: t[0])
    return [r for _, r in out], injected


def strip_labels(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "label"} for r in records]
