"""Quick SKAB run on the real shared data (skipped when ../shared/data is absent)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.evaluate import skab


@pytest.mark.data
def test_skab_valve2_quick(shared_data: Path) -> None:
    folder = shared_data / "skab" / "valve2"
    if not folder.exists():
        pytest.skip("no skab/valve2 in shared data")
    res = skab.evaluate(folder, replace(skab.SkabConfig(), epochs=3))
    assert res["files"] == 4
    assert res["test_events"] > 2000
    assert 0.2 < res["f1"] <= 1.0
    assert res["far"] < 0.6
