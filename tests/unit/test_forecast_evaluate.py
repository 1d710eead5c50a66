"""The forecasting family and the dynamic threshold through `pipeline evaluate`'s protocols, on tiny
synthetic folders in the NASA (single-column series, as the held-out benchmarks have) and SKAB layouts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError
from pipeline.evaluate import common, nasa, select, skab

FAST = {"hidden_size": 8, "tbptt": 16, "segment": 64, "batch_size": 8}


def _nasa_single_column(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for c in ("A-1", "B-2"):
        t = np.arange(300)
        np.save(root / "train" / f"{c}.npy", (np.sin(t / 8) + rng.normal(0, 0.05, 300))[:, None])
        test = np.sin((300 + t) / 8) + rng.normal(0, 0.05, 300)
        test[150:170] += 2.0
        np.save(root / "test" / f"{c}.npy", test[:, None])  # one column: the value only, no command flags
        rows.append((c, "[[150, 169]]"))
    pd.DataFrame(rows, columns=["chan_id", "anomaly_sequences"]).to_csv(root / nasa.LABELS, index=False)
    return root


def _skab(root: Path) -> Path:
    rng = np.random.default_rng(1)
    (root / "other").mkdir(parents=True)
    for i in range(2):
        x = rng.normal(0, 1, (200, 3)) + np.sin(np.arange(200) / 10)[:, None]
        y = np.zeros(200, int)
        x[150:180, 0] += 6.0
        y[150:180] = 1
        df = pd.DataFrame(x, columns=["a", "b", "c"], index=pd.date_range("2020-01-01", periods=200, freq="s"))
        df.index.name = "datetime"
        df["anomaly"], df["changepoint"] = y, 0
        df.to_csv(root / "other" / f"{i}.csv", sep=";")
    return root


@pytest.mark.parametrize(
    "threshold", [{}, {"threshold_method": "dynamic", "dynamic": {"window": 100, "min_errors": 50, "buffer": 2}}]
)
def test_nasa_forecaster_on_single_column_series(tmp_path: Path, threshold: dict) -> None:
    data = _nasa_single_column(tmp_path / "nasa")
    cfg = common.configured(
        nasa.NasaConfig(), {"family": "lstm_forecast", "forecast": FAST, "epochs": 2, "z": 3.0, **threshold}
    )
    out = nasa.evaluate(data, cfg)
    assert {"f1", "precision", "recall", "tp", "fp", "fn"} <= set(out)
    assert out["tp"] + out["fn"] == 2 and 0.0 <= out["f1"] <= 1.0


def test_skab_default_is_the_forecaster_and_runs(tmp_path: Path) -> None:
    assert skab.SkabConfig().family == "lstm_forecast"
    data = _skab(tmp_path / "skab")
    out = skab.evaluate(data, replace(skab.SkabConfig(), train_rows=100, epochs=2, forecast=FAST))
    assert out["files"] == 2 and 0.0 <= out["f1"] <= 1.0 and 0.0 <= out["far"] <= 1.0


def test_unknown_family_and_forecast_parameters_are_config_errors(tmp_path: Path) -> None:
    data = _skab(tmp_path / "skab")
    with pytest.raises(ConfigError, match="family"):
        skab.evaluate(data, replace(skab.SkabConfig(), train_rows=100, family="gru"))
    with pytest.raises(ConfigError, match="forecast"):
        skab.evaluate(data, replace(skab.SkabConfig(), train_rows=100, forecast={"hidden": 3}))


def test_select_ranks_candidates_across_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = ["--source", f"skab:{_skab(tmp_path / 's')}:100", "--source", f"nasa:{_nasa_single_column(tmp_path / 'n')}"]
    model = json.dumps({"family": "lstm_forecast", "forecast": FAST, "epochs": 1})
    assert select.main([*src, "--model", model, "--threshold", '{"z": 2}', "--threshold", '{"z": 6}']) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    ranked = [x for x in lines if "mean_rank" in x]
    assert len([x for x in lines if "source" in x]) == 4 and len(ranked) == 2
    assert sorted(r["mean_rank"] for r in ranked) == [r["mean_rank"] for r in ranked]
    log = tmp_path / "sel.log"
    log.write_text("\n".join(json.dumps(x) for x in lines))
    assert select.main(["--rank-logs", str(log)]) == 0
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["candidate"] for r in again] == [r["candidate"] for r in ranked]


def test_rank_puts_candidates_over_the_far_bound_last() -> None:
    table = {
        "s1": {"a": {"f1": 0.9, "far": 0.3}, "b": {"f1": 0.5, "far": 0.1}},
        "s2": {"a": {"f1": 0.9}, "b": {"f1": 0.8}},
    }
    out = select.rank(table, 0.15)
    # a beats b on F1 in s1 but is over the FAR bound there: ranked last; equal mean ranks -> higher mean F1
    assert {r["candidate"]: r["ranks"] for r in out} == {"a": [2.0, 1.0], "b": [1.0, 2.0]}
    assert [r["candidate"] for r in out] == ["a", "b"]


def test_select_over_seeds_ranks_the_mean_and_reports_the_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--seeds trains each model candidate once per seed; its row is the mean over seeds (the same as the
    single-seed runs averaged), and the ranking line carries the seed spread."""
    src = ["--source", f"nasa:{_nasa_single_column(tmp_path / 'n')}"]
    model = json.dumps({"family": "lstm_forecast", "forecast": FAST, "epochs": 1})
    singles = []
    for seed in (0, 1):
        m = json.dumps({"family": "lstm_forecast", "forecast": FAST, "epochs": 1, "seed": seed})
        assert select.main([*src, "--model", m, "--threshold", '{"z": 2}']) == 0
        singles.append([json.loads(x) for x in capsys.readouterr().out.splitlines() if '"source"' in x][-1]["f1"])
    assert select.main([*src, "--model", model, "--threshold", '{"z": 2}', "--seeds", "0", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    row = next(x for x in lines if "source" in x)
    assert row["f1_seeds"] == singles and row["f1"] == pytest.approx(np.mean(singles))
    assert "seed" not in json.loads(row["candidate"])  # one candidate over the seeds
    ranked = next(x for x in lines if "mean_rank" in x)
    assert ranked["seed_spread"] == pytest.approx(abs(singles[0] - singles[1]))


def test_over_seeds_averages_f1_and_far() -> None:
    out = select.over_seeds([{"f1": 0.5, "far": 0.1, "tp": 3}, {"f1": 0.7, "far": 0.3, "tp": 5}])
    assert out == {"f1": pytest.approx(0.6), "far": pytest.approx(0.2), "f1_seeds": [0.5, 0.7]}
    assert select.over_seeds([{"f1": 0.5}]) == {"f1": 0.5}


@pytest.mark.parametrize("fmt", ["skab", "nasa"])
def test_select_row_with_a_model_per_entity_equals_pipeline_evaluate(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A candidate with model_per_file / model_per_channel is trained one model per entity, as `pipeline
    evaluate` trains it, so its select row is that configuration's evaluate result on the folder."""
    knob = "model_per_file" if fmt == "skab" else "model_per_channel"
    over = {"family": "lstm_forecast", "forecast": FAST, "epochs": 2, knob: True}
    if fmt == "skab":
        data, source = _skab(tmp_path / "s"), f"skab:{tmp_path / 's'}:100"
        want = skab.evaluate(data, common.configured(skab.SkabConfig(), {**over, "train_rows": 100, "z": 3.0}))
    else:
        data, source = _nasa_single_column(tmp_path / "n"), f"nasa:{tmp_path / 'n'}"
        want = nasa.evaluate(data, common.configured(nasa.NasaConfig(), {**over, "z": 3.0}))
    assert select.main(["--source", source, "--model", json.dumps(over), "--threshold", '{"z": 3.0}']) == 0
    row = next(json.loads(x) for x in capsys.readouterr().out.splitlines() if '"source"' in x)
    assert (row["f1"], row["tp"], row["fp"], row["fn"]) == (want["f1"], want["tp"], want["fp"], want["fn"])
