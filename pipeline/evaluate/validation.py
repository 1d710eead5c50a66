"""Validation sets for choosing hyper-parameters without touching any benchmark's test part.

SKAB: the anomaly-free experiment is cut into pseudo-experiments with the SKAB layout; each gets one
injected fault (level shift, drift or noise burst on a few channels) after its first 400 rows. NASA: each
channel's *training* series is split; the tail becomes a pseudo test part with injected segments. Both
write folders in the benchmark's own format, so `pipeline evaluate` runs on them unchanged.

    python -m pipeline.evaluate.validation skab ../shared/data/skab /tmp/skab-val
    python -m pipeline.evaluate.validation skab-train ../shared/data/skab /tmp/skab-val2   # train_rows=250
    python -m pipeline.evaluate.validation nasa ../shared/data/nasa_msl /tmp/nasa-val

Univariate sets in the NASA layout with one column (the value, no command flags), fitted and scored on
themselves (train/X.npy == test/X.npy, the Orion protocol for univariate benchmarks), so the NASA
format's defaults are chosen for single-column series too:

    python -m pipeline.evaluate.validation msl-uni ../shared/data/nasa_msl /tmp/msl-uni     # MSL training series
    python -m pipeline.evaluate.validation skab-uni ../shared/data/skab /tmp/skab-uni       # anomaly-free channels
    python -m pipeline.evaluate.validation tep-uni /tmp/tep-late /tmp/tep-uni               # real TEP faults
"""

from __future__ import annotations

import argparse
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
    labels = pd.read_csv(nasa_dir / "labeled_anomalies.csv")
    channels: dict[str, tuple[np.ndarray, np.ndarray, list[list[int]]]] = {}
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
        channels[chan] = (tr, te, seqs)
    return write_nasa(channels, out, "VAL")


def write_nasa(channels: dict[str, tuple[np.ndarray, np.ndarray, list[list[int]]]], out: Path, spacecraft: str) -> Path:
    """The telemanom layout: train/<chan>.npy, test/<chan>.npy and labeled_anomalies.csv (test indices)."""
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    rows = []
    for chan, (train, test, seqs) in channels.items():
        np.save(out / "train" / f"{chan}.npy", train)
        np.save(out / "test" / f"{chan}.npy", test)
        rows.append(
            {
                "chan_id": chan,
                "spacecraft": spacecraft,
                "anomaly_sequences": str(seqs),
                "class": "[]",
                "num_values": len(test),
            }
        )
    pd.DataFrame(rows).to_csv(out / "labeled_anomalies.csv", index=False)
    return out


UNI_KINDS = ("spike", "shift", "drift", "noise")


def _uni_fault(x: np.ndarray, start: int, end: int, std: float, kind: str, rng: np.random.Generator) -> None:
    """One fault on a 1-D series, in place: a spike (a few points far out), a level shift, a drift or a
    noise burst. Magnitudes in units of the series' own spread."""
    n = end - start
    sign = rng.choice([-1.0, 1.0])
    if kind == "spike":
        x[start:end] += sign * rng.uniform(3.0, 6.0) * std
    elif kind == "shift":
        x[start:end] += sign * rng.uniform(1.0, 3.0) * std
    elif kind == "drift":
        x[start:end] += sign * rng.uniform(1.0, 3.0) * std * np.linspace(0.2, 1.5, n)
    else:
        x[start:end] += rng.normal(0.0, rng.uniform(1.0, 3.0) * std, n)


def inject_univariate(x: np.ndarray, rng: np.random.Generator, *, max_faults: int = 3) -> list[list[int]]:
    """1-`max_faults` faults (in place), one per disjoint slot of the series after its first tenth (a model
    needs a normal start); returns the labelled [first, last] index pairs. Spikes last 1-5 points, the other
    kinds 1/40-1/10 of the series."""
    n = len(x)
    std = max(float(np.std(x)), 1e-3 * (abs(float(np.mean(x))) + 1.0))
    k = int(rng.integers(1, max_faults + 1))
    lo0 = n // 10
    slot = (n - lo0) // k
    seqs = []
    for j in range(k):
        kind = str(rng.choice(UNI_KINDS))
        length = int(rng.integers(1, 6)) if kind == "spike" else int(rng.integers(max(5, n // 40), max(10, n // 10)))
        length = min(length, slot - 1)
        lo = lo0 + j * slot
        start = int(rng.integers(lo, max(lo + 1, lo + slot - length)))
        end = min(n, start + length)
        _uni_fault(x, start, end, std, kind, rng)
        seqs.append([start, end - 1])
    return seqs


def write_univariate(series: dict[str, tuple[np.ndarray, list[list[int]]]], out: Path, spacecraft: str) -> Path:
    """NASA layout, one column per series, train == test (fitted and scored on itself)."""
    columns = {name: np.asarray(x, np.float64).reshape(-1, 1) for name, (x, _) in series.items()}
    return write_nasa(
        {name: (columns[name], columns[name], seqs) for name, (_, seqs) in series.items()}, out, spacecraft
    )


def msl_univariate_set(nasa_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """Each MSL channel's *training* series, value column only, with injected faults."""
    rng = np.random.default_rng(seed)
    series: dict[str, tuple[np.ndarray, list[list[int]]]] = {}
    for chan in pd.read_csv(nasa_dir / "labeled_anomalies.csv")["chan_id"]:
        f = nasa_dir / "train" / f"{chan}.npy"
        if f.exists() and chan not in series:
            x = np.load(f)[:, 0].astype(np.float64)
            series[chan] = (x, inject_univariate(x, rng))
    return write_univariate(series, out, "VAL-MSL")


def skab_univariate_set(skab_dir: Path, out: Path, *, chunk: int = 2300, seed: int = 0) -> Path:
    """SKAB's anomaly-free experiment: every channel, cut into `chunk`-row series, with injected faults."""
    df = pd.read_csv(skab_dir / "anomaly-free" / "anomaly-free.csv", sep=";", index_col="datetime")
    rng = np.random.default_rng(seed)
    chans = [c for c in df.columns if c not in ("anomaly", "changepoint")]
    series: dict[str, tuple[np.ndarray, list[list[int]]]] = {}
    for i in range(len(df) // chunk):
        for j, c in enumerate(chans):
            x = df[c].to_numpy(np.float64)[i * chunk : (i + 1) * chunk].copy()
            series[f"skab-{i}-{j}"] = (x, inject_univariate(x, rng))
    return write_univariate(series, out, "VAL-SKAB")


def tep_univariate_set(tep_dir: Path, out: Path, *, per_run: int = 3, min_sigma: float = 3.0) -> Path:
    """Real faults: TEP fault runs (pipeline.evaluate.tep, SKAB layout; generate them with a late onset, e.g.
    --horizon 72 --onset 60, so most of each series is normal). Per run, the `per_run` channels whose mean
    after the onset moves most, in pre-onset standard deviations, if at least `min_sigma`; labelled from the
    onset to the end. Normal runs contribute their first `per_run` channels with no label (false-alarm check)."""
    from pipeline.evaluate.skab import find_files, read

    series: dict[str, tuple[np.ndarray, list[list[int]]]] = {}
    for f in find_files(tep_dir):
        df = read(f)
        y = df["anomaly"].to_numpy() > 0
        chans = [c for c in df.columns if c not in ("anomaly", "changepoint")]
        x = df[chans].to_numpy(np.float64)
        if not y.any():
            for c in range(per_run):
                series[f"{f.stem}-{c}"] = (x[:, c], [])
            continue
        onset = int(np.flatnonzero(y)[0])
        pre, post = x[:onset], x[onset:]
        move = np.abs(post.mean(axis=0) - pre.mean(axis=0)) / (pre.std(axis=0) + 1e-9)
        for c in np.argsort(-move)[:per_run]:
            if move[c] >= min_sigma:
                series[f"{f.stem}-{c}"] = (x[:, c], [[onset, len(x) - 1]])
    return write_univariate(series, out, "VAL-TEP")


MAKERS: dict[str, Callable[[Path, Path], Path]] = {
    "skab": skab_set,
    "skab-train": skab_train_set,
    "nasa": nasa_set,
    "msl-uni": msl_univariate_set,
    "skab-uni": skab_univariate_set,
    "tep-uni": tep_univariate_set,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate.validation", description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(MAKERS))
    ap.add_argument("source", type=Path, help="the benchmark folder (tep-uni: a folder of TEP runs)")
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    try:
        print(MAKERS[args.kind](args.source, args.out))
    except (OSError, KeyError, ValueError) as exc:  # a missing file, a CSV without the expected columns
        print(f"error: {args.kind} from {args.source}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
