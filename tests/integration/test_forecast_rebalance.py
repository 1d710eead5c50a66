"""The stateful forecasting family on the real broker and database: a rebalance between two workers moves
each entity's (h, c) with its state snapshot, and the run's alerts equal an uninterrupted replay of the
same topic (the rebalance test of test_durability.py, with a forecaster as the sensors model)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from models.lstm_ae import bundled_checkpoint_path
from models.lstm_forecast import ForecastConfig, ForecastTrainConfig, save_forecaster
from pipeline.features.streams import SensorStream
from pipeline.replay.core import run_replay
from pipeline.simulate import SENSOR_CHANNELS, simulate_sensors, strip_labels
from pipeline.training import train_stream_forecaster
from tests.sql_helpers import SqlTestStore
from tests.stream_helpers import (
    PARTITIONS,
    Runner,
    alert_set,
    make_processor,
    produce_sensors,
    sensor_records,
    settings_for,
    stop_workers,
    wait_until,
)


@pytest.fixture(scope="module")
def forecast_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("forecast-models")
    spec = SensorStream(SENSOR_CHANNELS)
    recs, _ = simulate_sensors(12, 200, seed=5)
    cols = spec.columns([spec.parse(r) for r in strip_labels(recs)])
    ckpt = train_stream_forecaster(
        spec,
        cols,
        model=ForecastConfig(n_features=spec.n_features, hidden_size=32),
        train=ForecastTrainConfig(epochs=8, seed=0, tbptt=32, segment=128),
        min_history=8,
    )
    save_forecaster(ckpt, out / "sensors.pt")
    shutil.copy(bundled_checkpoint_path("transactions"), out / "transactions.pt")
    return out


def test_rebalance_moves_forecaster_state(
    kafka_bootstrap: str, pg_store: SqlTestStore, pg_url: str, topic_prefix: str, forecast_models: Path
) -> None:
    s = settings_for(topic_prefix, pg_url)
    s.models_dir = forecast_models
    recs = sensor_records(24, 80)
    first, second = recs[: len(recs) // 2], recs[len(recs) // 2 :]
    produce_sensors(kafka_bootstrap, s.sensors_topic, first)
    db1, db2 = SqlTestStore(pg_url), SqlTestStore(pg_url)
    w1, src1, dlq1 = make_processor(s, kafka_bootstrap, db1)
    w2, src2, dlq2 = make_processor(s, kafka_bootstrap, db2)
    assert w1.scorers[s.sensors_topic].store.layout.recurrent == 32
    r1, r2 = Runner(w1).start(), Runner(w2).start()

    def durable() -> int:
        try:
            return sum(c for c, _ in pg_store.load_offsets("live", s.group_id).values())
        except Exception:  # noqa: BLE001 - not yet
            return -1

    try:
        wait_until(
            lambda: (
                len(src1.consumer.assignment()) == len(src2.consumer.assignment()) == PARTITIONS // 2
                and durable() == len(first)
            ),
            90,
            "two workers sharing the partitions, first half durable",
        )
        store2 = w2.scorers[s.sensors_topic].store
        moved = set(store2.live())
        assert moved, "the stopped worker owned entities"
        assert np.abs(store2.rnn_h[list(store2.live().values())]).sum() > 0  # (h, c) really evolved
        r2.stop.set()
        r2.join(30)
        src2.close()
        wait_until(lambda: len(src1.consumer.assignment()) == PARTITIONS, 60, "w1 owning every partition")
        produce_sensors(kafka_bootstrap, s.sensors_topic, second, create=False)
        wait_until(lambda: durable() == len(recs), 90, "second half durable")
    finally:
        stop_workers([r1, r2], [src1, src2, dlq1, dlq2])
    per_entity = Counter(r["device_id"] for r in recs)
    store = w1.scorers[s.sensors_topic].store
    for e in moved:
        assert int(store.count[store.live()[e]]) == per_entity[e]
    keys = Counter((a["source_partition"], a["source_offset"]) for a in pg_store.list_alerts(run_id="live"))
    assert keys and max(keys.values()) == 1  # alerts were raised, none twice
    run_replay(s, kafka_bootstrap, [s.sensors_topic], run_id="reference", db=pg_store)
    assert alert_set(pg_store, "live") == alert_set(pg_store, "reference")
    db1.dispose()
    db2.dispose()
