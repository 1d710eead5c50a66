"""TEP validation runs (pipeline.evaluate.tep): a tiny simulated fixture in the SKAB layout, features
restricted to measurements and implemented actions, label on at the disturbance onset."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("tep_studio")

from pipeline.evaluate import skab, tep  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tep")
    tep.generate(out, seeds=[0], idvs=[6], horizon_h=3.0, onset_h=2.0)  # 60 samples, onset at sample 40
    return out


def test_layout_labels_and_columns(runs: Path) -> None:
    files = sorted((runs / tep.SUBFOLDER).glob("*.csv"))
    assert [f.name for f in files] == ["tep-idv06-s0.csv", "tep-normal-s0.csv"]
    fault = pd.read_csv(files[0], sep=";", index_col="datetime", parse_dates=True)
    normal = pd.read_csv(files[1], sep=";", index_col="datetime", parse_dates=True)
    feats = [c for c in fault.columns if c not in ("anomaly", "changepoint")]
    assert feats and all(c.startswith(("measurement.", "implemented_action.")) for c in feats)
    assert not any(c.startswith(("state.", "disturbance.", "requested_action.")) for c in fault.columns)
    hours = (fault.index - tep.EPOCH).total_seconds().to_numpy() / 3600.0
    y = fault["anomaly"].to_numpy()
    assert y.sum() > 0 and normal["anomaly"].sum() == 0
    first = int(np.flatnonzero(y)[0])
    assert hours[first] >= 2.0 and hours[first - 1] < 2.0  # on from the first sample at or after the onset
    assert y[first:].all() and fault["changepoint"].sum() == 1
    assert np.isfinite(fault[feats].to_numpy()).all()


def test_skab_protocol_runs_on_the_tep_layout(runs: Path) -> None:
    cfg = replace(
        skab.SkabConfig(),
        train_rows=30,
        epochs=1,
        model={"window": 8, "hidden_size": 8, "latent_size": 4, "score_steps": 2},
    )
    res = skab.evaluate(runs, cfg)
    assert res["files"] == 2 and res["test_events"] == 2 * 30
    assert 0.0 <= res["f1"] <= 1.0


def test_cli_rejects_bad_disturbance_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tep.main(["generate", "--out", str(tmp_path), "--idv", "29"]) == 2
    assert "1-28" in capsys.readouterr().err
