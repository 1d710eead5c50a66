"""A tiny CSV in the Fraud Detection Handbook's layout (tests must not need ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def handbook_csv(path: Path, days: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2018-04-01")
    rows = []
    for c in range(12):
        for t in np.sort(rng.uniform(0, days * 86400, 20)):
            rows.append(
                (
                    start + pd.Timedelta(seconds=int(t)),
                    c,
                    int(rng.integers(0, 6)),
                    round(float(rng.gamma(2, 20)), 2),
                    int(rng.random() < 0.1),
                )
            )
    df = pd.DataFrame(rows, columns=["TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD"])
    df.insert(0, "TRANSACTION_ID", range(len(df)))
    df.to_csv(path, index=False)
    return path
