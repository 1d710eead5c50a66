"""Validation grids: the rows of docs/results/evaluation.md's tables, reproducible from the repo.

Runs `pipeline evaluate`'s own protocol (skab.evaluate / nasa.evaluate) on one or more folders for each z
in a list, with config overrides, and prints one JSON line per (folder, z) plus one pooled line per z
(counts summed over the folders, then the metric), which is what the selection rules read. Meant for
validation sets (pipeline.evaluate.validation), not for a benchmark's test part.

    python -m pipeline.evaluate.sweep skab /tmp/skab-val1 /tmp/skab-val2:250 --z 2.5 3 3.5 \\
        --set model_per_file=true --set 'model={"window": 16}'
    python -m pipeline.evaluate.sweep nasa /tmp/nasa-val --z 4 5 6 --set model_per_channel=true

A folder may end in `:N` to set SKAB's train_rows for it (the skab-train set uses 250).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.evaluate import common
from pipeline.evaluate.metrics import pointwise_from_counts, segment_f1_from_counts

COUNTS = ("tp", "fp", "fn", "tn")


def parse_overrides(pairs: list[str], config_type: type) -> dict[str, Any]:
    """`key=json` pairs -> overrides of the format's config dataclass; unknown keys are a ConfigError."""
    known = {f.name for f in fields(config_type)} - {"threshold"} | common.KNOBS
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = {**getattr(config_type(), key), **value} if isinstance(value, dict) else value
    return out


def _protocol(fmt: str) -> tuple[type, Callable[..., dict[str, Any]]]:
    """The format's config dataclass and its `evaluate` (the same functions `pipeline evaluate` calls)."""
    if fmt == "skab":
        from pipeline.evaluate import skab

        return skab.SkabConfig, skab.evaluate
    if fmt == "nasa":
        from pipeline.evaluate import nasa

        return nasa.NasaConfig, nasa.evaluate
    raise ConfigError(f"format {fmt!r}: sweeps cover skab and nasa (transactions ranks scores, no z)")


def pooled(fmt: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counts of per-folder results and recompute the format's headline metrics."""
    c = {k: sum(int(r.get(k, 0)) for r in rows) for k in COUNTS}
    if fmt == "skab":
        return pointwise_from_counts(c["tp"], c["fp"], c["fn"], c["tn"])
    return segment_f1_from_counts(c["tp"], c["fp"], c["fn"])


def sweep(fmt: str, folders: list[str], zs: list[float], overrides: dict[str, Any]) -> list[dict[str, Any]]:
    config_type, run = _protocol(fmt)
    base = common.configured(config_type(), overrides)
    out = []
    for z in zs:
        rows = []
        for spec in folders:
            path, _, rows_part = spec.partition(":")
            if rows_part and not rows_part.isdigit():
                raise ConfigError(f"{spec!r}: FOLDER:N needs a whole number of training rows after ':'")
            cfg = common.configured(base, {"z": z, **({"train_rows": int(rows_part)} if rows_part else {})})
            res = run(Path(path), cfg)
            rows.append(res)
            print(json.dumps({"data": spec, "z": z, **{k: res[k] for k in ("f1", *COUNTS) if k in res}}), flush=True)
        summary = {"data": "pooled", "z": z, **pooled(fmt, rows)}
        print(json.dumps(summary), flush=True)
        out.append(summary)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("format", choices=("skab", "nasa"))
    ap.add_argument("folders", nargs="+", help="validation folders; FOLDER:N sets SKAB train_rows")
    ap.add_argument("--z", type=float, nargs="+", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON")
    args = ap.parse_args(argv)
    try:
        sweep(args.format, args.folders, args.z, parse_overrides(args.overrides, _protocol(args.format)[0]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
