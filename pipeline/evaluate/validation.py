"""Validation sets for choosing hyper-parameters without touching any benchmark's test part.

SKAB: the anomaly-free experiment is cut into pseudo-experiments with the SKAB layout; each gets one
injected fault (level shift, drift or noise burst on a few channels) after its first 400 rows. NASA: each
channel's *training* series is split; the tail becomes a pseudo test part with injected segments. Both
write folders in the benchmark's own format, so `pipeline evaluate` runs on them unchanged.

    python -m pipeline.evaluate.validation skab ../shared/data/skab /tmp/skab-val
    python -m pipeline.evaluate.validation skab-train ../shared/data/skab /tmp/skab-val2   # train_rows=250
    python -m pipeline.evaluate.validation nasa ../shared/data/nasa_msl /tmp/nasa-val
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd


def _fault(x: np.ndarray, start: int, end: int, std: np.ndarray, rng: np.random.Generator) -> None:
    """Inject one fault in rows [start, end) of x (in place) on 1-3 channels."""
    k = x.shape[1]
    chans = rng.choice(k, size=int(rng.integers(1, min(3, k) + 1)), replace=False)
    kind = rng.choice(["shift", "drift", "noise"])
    n = end - start
    for c in chans:
        mag = rng.uniform(2.0, 5.0) * std[c] * rng.choice([-1.0, 1.0])
        if kind == "shift":
            x[start:end, c] += mag
        elif kind == "drift":
            x[start:end, c] += mag * np.linspace(0.2, 1.5, n)
        else:
            x[start:end, c] += rng.normal(0.0, abs(mag), n)


def _write_with_fault(
    df: pd.DataFrame, chans: list[str], train_rows: int, start: int, length: int, rng: np.random.Generator, path: Path
) -> None:
    """Inject one fault into rows [start, start+length), label it, write a SKAB-format CSV."""
    x = df[chans].to_numpy(np.float64, copy=True)
    std = x[:train_rows].std(axis=0) + 1e-9
    _fault(x, start, start + length, std, rng)
    df[chans] = x
    df["anomaly"] = 0.0
    df.iloc[start : start + length, df.columns.get_loc("anomaly")] = 1.0
    df["changepoint"] = 0.0
    df.to_csv(path, sep=";")


def skab_set(skab_dir: Path, out: Path, *, chunk: int = 1150, train_rows: int = 400, seed: int = 0) -> Path:
    """Pseudo-experiments from anomaly-free/anomaly-free.csv, written as out/other/<i>.csv."""
    src = skab_dir / "anomaly-free" / "anomaly-free.csv"
    df = pd.read_csv(src, sep=";", index_col="datetime", parse_dates=True)
    rng = np.random.default_rng(seed)
    chans = [c for c in df.columns if c not in ("anomaly", "changepoint")]
    (out / "other").mkdir(parents=True, exist_ok=True)
    for i in range(len(df) // chunk):
        part = df.iloc[i * chunk : (i + 1) * chunk].copy()
        n_test = chunk - train_rows
        length = int(rng.integers(n_test // 4, n_test // 2))
        start = train_rows + int(rng.integers(n_test // 10, n_test - length))
        _write_with_fault(part, chans, train_rows, start, length, rng, out / "other" / f"{i}.csv")
    return out


def skab_train_set(skab_dir: Path, out: Path, *, rows: int = 400, train_rows: int = 250, seed: int = 0) -> Path:
    """From each anomalous experiment's *training part* (its first `rows` rows): the first `train_rows` stay
    training, the rest get one injected fault, written as out/other/<subset>-<name>.csv. The normal rows keep
    the experiment's own drift, so FAR on it is realistic. Evaluate with SkabConfig(train_rows=train_rows)."""
    from pipeline.evaluate.skab import find_files, read

    rng = np.random.default_rng(seed)
    (out / "other").mkdir(parents=True, exist_ok=True)
    n_test = rows - train_rows
    for f in find_files(skab_dir):
        df = read(f).iloc[:rows].copy()
        chans = [c for c in df.columns if c not in ("anomaly", "changepoint")]
        length = int(rng.integers(n_test * 4 // 15, n_test * 2 // 3))
        start = train_rows + int(rng.integers(n_test // 15, n_test - length))
        _write_with_fault(df, chans, train_rows, start, length, rng, out / "other" / f"{f.parent.name}-{f.stem}.csv")
    return out


def nasa_set(nasa_dir: Path, out: Path, *, test_fraction: float = 0.4, seed: int = 0) -> Path:
    """Split each channel's training series: head -> train/, tail (+ injected segment) -> test/."""
    rng = np.random.default_rng(seed)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    labels = pd.read_csv(nasa_dir / "labeled_anomalies.csv")
    rows = []
    for chan in labels["chan_id"]:
        f = nasa_dir / "train" / f"{chan}.npy"
        if not f.exists():
            continue
        x = np.load(f).astype(np.float64)
        cut = int(len(x) * (1 - test_fraction))
        tr, te = x[:cut], x[cut:].copy()
        seqs = []
        n_seg = int(rng.integers(1, 3))
        for j in range(n_seg):
            length = int(rng.integers(max(10, len(te) // 40), max(20, len(te) // 8)))
            lo = j * len(te) // n_seg
            start = int(rng.integers(lo, max(lo + 1, lo + len(te) // n_seg - length)))
            end = min(len(te), start + length)
            v = te[:, :1]
            _fault(v, start, end, np.array([max(float(tr[:, 0].std()), 0.05)]), rng)
            te[:, 0] = np.clip(v[:, 0], -1.5, 1.5)
            seqs.append([start, end - 1])
        np.save(out / "train" / f"{chan}.npy", tr)
        np.save(out / "test" / f"{chan}.npy", te)
        rows.append(
            {"chan_id": chan, "spacecraft": "VAL", "anomaly_sequences": str(seqs), "class": "[]", "num_values": len(te)}
        )
    pd.DataFrame(rows).to_csv(out / "labeled_anomalies.csv", index=False)
    return out


if __name__ == "__main__":
    kind, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    makers: dict[str, Callable[[Path, Path], Path]] = {"skab": skab_set, "skab-train": skab_train_set, "nasa": nasa_set}
    print(makers[kind](src, dst))
