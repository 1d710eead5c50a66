"""Tennessee Eastman validation runs (tep-studio) written in the SKAB layout.

Why the SKAB layout: SKAB's protocol (per file = entity, its first `train_rows` rows are normal and train
the shared model and warm the entity's scaling and thresholds; the rest is scored point-wise) is the TEP
fault-detection protocol (a normal stretch, then a disturbance switched on at a known time), so
`pipeline evaluate --format skab --data DIR` and `pipeline.evaluate.sweep skab DIR` run on these folders
unchanged, next to the other validation sources.

What is written (`generate`): for each seed, one *normal* run (no disturbance; its rows after the training
part are normal test rows, i.e. a pure false-alarm check) and one *fault* run per IDV with the disturbance
switched on at `onset_h` hours (after the training part). Onset convention: the `anomaly` label is the
simulator's own `disturbance.idv_XX` flag, which turns on at the first sample at or after the onset; no
detection-delay allowance (slowly propagating faults count as missed until they show). Features are the
`measurement.*` and `implemented_action.*` columns only: `state.*` (internal plant state) and
`disturbance.*` (the truth) never enter a model.

Needs the optional `tep-studio` package (`pip install '.[validation]'`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError

FEATURE_PREFIXES = ("measurement.", "implemented_action.")
# detectable TEP disturbances (3, 9 and 15 are the classic undetectable ones) covering steps, random
# variation, kinetics drift and valve stiction
DEFAULT_IDVS = (1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 17, 18)
SUBFOLDER = "other"  # a SKAB subset folder, so skab.find_files picks the runs up in a stable order
EPOCH = pd.Timestamp("2026-01-01")


@dataclass(frozen=True)
class TepRun:
    seed: int
    idv: int | None  # None = normal operation
    horizon_h: float
    onset_h: float

    @property
    def name(self) -> str:
        kind = "normal" if self.idv is None else f"idv{self.idv:02d}"
        return f"tep-{kind}-s{self.seed}"


def features(df: pd.DataFrame) -> list[str]:
    """The columns a model may read: measurements and the actions the controllers implemented."""
    return [c for c in df.columns if c.startswith(FEATURE_PREFIXES)]


def to_skab(df: pd.DataFrame, idv: int | None) -> pd.DataFrame:
    """One simulator trajectory -> SKAB-layout frame (datetime index, features, anomaly, changepoint)."""
    if "is_initial" in df.columns:  # the initial-condition row is not a sample
        df = df[~df["is_initial"].astype(bool)]
    cols = features(df)
    if not cols:
        raise ConfigError("tep run: no measurement.* / implemented_action.* columns in the simulator output")
    out = df[cols].astype(np.float64).reset_index(drop=True)
    if idv is None:
        label = np.zeros(len(out), bool)
    else:
        flag = f"disturbance.idv_{idv:02d}"
        if flag not in df.columns:
            raise ConfigError(f"tep run: no {flag} column in the simulator output")
        label = df[flag].to_numpy(np.float64) > 0
    out["anomaly"] = label.astype(np.int64)
    out["changepoint"] = np.r_[label[:1], label[1:] & ~label[:-1]].astype(np.int64)
    out.index = pd.DatetimeIndex(EPOCH + pd.to_timedelta(df["time"].to_numpy(np.float64), unit="h"), name="datetime")
    return out


def simulate(run: TepRun, workdir: Path) -> pd.DataFrame:
    """Run the simulator's CLI (a separate process: its C extension's state stays out of ours)."""
    out = workdir / f"{run.name}.csv"
    cmd = [
        sys.executable,
        "-m",
        "tep_studio.cli",
        "run",
        "--horizon",
        str(run.horizon_h),
        "--seed",
        str(run.seed),
        "--out",
        str(out),
    ]
    if run.idv is not None:
        cmd += ["--idv", f"idv_{run.idv:02d}@{run.onset_h}"]
    done = subprocess.run(cmd, capture_output=True, text=True)  # noqa: S603 - an argument list, no shell
    if done.returncode != 0 or not out.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(
            f"tep run {run.name} failed ({done.returncode}): {tail[0]} (is tep-studio installed? "
            "pip install '.[validation]')"
        )
    return pd.read_csv(out)


def generate(
    out: Path,
    seeds: list[int],
    idvs: list[int],
    *,
    horizon_h: float = 48.0,
    onset_h: float = 24.0,
    normal_runs: bool = True,
) -> list[Path]:
    """Write one normal run per seed (if `normal_runs`) and one fault run per (seed, IDV) under out/other/."""
    if onset_h >= horizon_h:
        raise ConfigError(f"onset {onset_h} h must be before the horizon {horizon_h} h")
    runs = [TepRun(s, None, horizon_h, onset_h) for s in seeds if normal_runs]
    runs += [TepRun(s, i, horizon_h, onset_h) for s in seeds for i in idvs]
    folder = out / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            frame = to_skab(simulate(run, Path(tmp)), run.idv)
            path = folder / f"{run.name}.csv"
            frame.to_csv(path, sep=";")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate.tep",
        description="labelled Tennessee Eastman validation runs in the SKAB layout",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="simulate normal and fault runs into DIR/other/*.csv")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    g.add_argument("--idv", type=int, nargs="+", default=list(DEFAULT_IDVS), help="disturbance numbers 1-28")
    g.add_argument("--horizon", type=float, default=48.0, help="simulated hours per run (20 samples per hour)")
    g.add_argument("--onset", type=float, default=24.0, help="disturbance onset, hours (after the training rows)")
    g.add_argument("--no-normal", action="store_true", help="fault runs only")
    args = ap.parse_args(argv)
    try:
        if any(not 1 <= i <= 28 for i in args.idv):
            raise ConfigError(f"--idv: disturbances are numbered 1-28, got {args.idv}")
        paths = generate(
            args.out, args.seeds, args.idv, horizon_h=args.horizon, onset_h=args.onset, normal_runs=not args.no_normal
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} runs to {args.out / SUBFOLDER}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
