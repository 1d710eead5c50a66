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
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

COUNTS = ("tp", "fp", "fn", "tn")


def parse_overrides(pairs: list[str], config_type: type) -> dict[str, Any]:
    """`key=json` pairs -> overrides of the format's config dataclass; unknown keys are a ConfigError."""
    known = {f.name for f in fields(config_type)}
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


def pooled(fmt: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counts of per-folder results and recompute the format's headline metrics."""
    c = {k: sum(int(r.get(k, 0)) for r in rows) for k in COUNTS}
    if fmt == "skab":
        tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
        return {**c, "f1": tp / (tp + (fp + fn) / 2) if tp + fp + fn else 1.0,
                "far": fp / (fp + tn) if fp + tn else 0.0, "mar": fn / (fn + tp) if fn + tp else 0.0}
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def sweep(fmt: str, folders: list[str], zs: list[float], overrides: dict[str, Any]) -> list[dict[str, Any]]:
    if fmt == "skab":
        from pipeline.evaluate import skab

        base: Any = replace(skab.SkabConfig(), **overrides)
        run: Any = skab.evaluate
    elif fmt == "nasa":
        from pipeline.evaluate import nasa

        base, run = replace(nasa.NasaConfig(), **overrides), nasa.evaluate
    else:
        raise ConfigError(f"format {fmt!r}: sweeps cover skab and nasa (transactions ranks scores, no z)")
    out = []
    for z in zs:
        rows = []
        for spec in folders:
            path, _, rows_part = spec.partition(":")
            cfg = replace(base, z=z, **({"train_rows": int(rows_part)} if rows_part else {}))
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
        from pipeline.evaluate import nasa, skab

        config_type = skab.SkabConfig if args.format == "skab" else nasa.NasaConfig
        sweep(args.format, args.folders, args.z, parse_overrides(args.overrides, config_type))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
