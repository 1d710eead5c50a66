"""Choose family / model / threshold by MEAN RANK across validation sources (never a test part).

Each source is a folder in a benchmark layout with its protocol: `skab:PATH[:TRAIN_ROWS]` (point-wise F1,
FAR; TEP runs from pipeline.evaluate.tep and the pipeline.evaluate.validation SKAB sets) or
`nasa:PATH` (segment F1; pipeline.evaluate.validation's NASA set from training tails). For each source and
each model candidate (family + parameters) the model is trained once, exactly as `pipeline evaluate`
trains it, and the events are streamed once per threshold candidate, exactly as `pipeline evaluate`
streams them; so a row equals the `pipeline evaluate` result of that configuration on that folder.

Rule: per source, candidates are ranked by F1, with point-wise candidates over `--max-far` ranked below
all that meet it; the mean rank over sources decides (ties: higher mean F1). One JSON line per (source,
candidate), then one line per candidate with its ranks, sorted best first.

`--seeds 0 1 2` trains every model candidate once per model seed; a candidate's F1 and FAR on a source are
then its means over the seeds (the per-seed F1s are listed), and the ranking line gives `seed_spread`, the
mean over sources of each candidate's max - min F1 across seeds. Why: on these sources a change of seed
moves F1 by up to 0.1, more than most differences between candidates (docs/results/evaluation.md, sixth
round), so a default changes only when it wins over seeds by more than that spread.

    python -m pipeline.evaluate.select --source skab:/tmp/tep --source skab:/tmp/skab-val2:250 \\
        --source nasa:/tmp/nasa-val --model '{"family": "lstm_ae"}' --model '{"family": "lstm_forecast"}' \\
        --threshold '{"z": 3}' --threshold '{"threshold_method": "dynamic"}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from models.lstm_ae import TrainConfig
from pipeline.errors import ConfigError
from pipeline.evaluate import common
from pipeline.evaluate.sweep import parse_overrides

REPORTED = ("f1", "far", "precision", "recall", "tp", "fp", "fn")


def _merged(default: Any, over: dict[str, Any]) -> dict[str, Any]:
    """Overrides on top of a config; dict-valued fields (model, forecast, dynamic) are merged, not replaced."""
    return {
        k: {**getattr(default, k), **v} if isinstance(v, dict) and isinstance(getattr(default, k, None), dict) else v
        for k, v in over.items()
    }


def _skab_runs(
    path: Path,
    rows: int | None,
    model_over: dict[str, Any],
    thresholds: list[dict[str, Any]],
    per_format: dict[str, Any],
) -> list[dict[str, Any]]:
    from pipeline.evaluate import skab
    from pipeline.features.streams import SensorStream

    over: dict[str, Any] = {**per_format, **model_over, **({"train_rows": rows} if rows else {})}
    base = common.configured(skab.SkabConfig(), _merged(skab.SkabConfig(), over))
    channels, train, test, y = skab.load(path, base.train_rows)
    spec = SensorStream(channels)
    model, _ = skab.model_config(base, train, len(channels))
    if base.model_per_file:  # a model per file is trained per threshold candidate: `pipeline evaluate`'s own path
        return [
            dict(skab.pointwise(y, _per_entity(spec, train, test, model, _threshold(base, t)).alerts))
            for t in thresholds
        ]
    ckpt = _fit(spec, train, model, base)
    out = []
    for t in thresholds:
        res = _stream(spec, ckpt, train, test, _threshold(base, t))
        out.append(dict(skab.pointwise(y, res.alerts)))
    return out


def _threshold(base: Any, over: dict[str, Any]) -> Any:
    return common.configured(base, _merged(base, over))


def _per_entity(spec: Any, train: Any, test: Any, model: Any, cfg: Any) -> common.Scored:
    return common.train_then_score(spec, train, test, model, cfg, name="select", model_per_entity=True)


def _nasa_runs(
    path: Path, model_over: dict[str, Any], thresholds: list[dict[str, Any]], per_format: dict[str, Any]
) -> list[dict[str, Any]]:
    from pipeline.evaluate import nasa
    from pipeline.evaluate.metrics import segment_f1, segments
    from pipeline.features.streams import SensorStream

    base = common.configured(nasa.NasaConfig(), _merged(nasa.NasaConfig(), {**per_format, **model_over}))
    chans, train, test, labeled, _, _ = nasa.load(path)
    spec = SensorStream(nasa.CHANNELS)
    from models.lstm_ae import LSTMAEConfig

    model = LSTMAEConfig(n_features=len(nasa.CHANNELS), **base.model)
    ckpt = None if base.model_per_channel else _fit(spec, train, model, base)
    ids = np.asarray(test.entity_ids, dtype=object)
    out = []
    for t in thresholds:
        cfg = _threshold(base, t)
        res = _per_entity(spec, train, test, model, cfg) if ckpt is None else _stream(spec, ckpt, train, test, cfg)
        pairs = [(labeled[c], nasa.merge(segments(res.alerts[ids == c]), cfg.merge_gap)) for c in chans]
        out.append(dict(segment_f1(pairs)))
    return out


def _fit(spec: Any, train: Any, model: Any, cfg: Any) -> Any:
    if cfg.family == "lstm_forecast":
        return common.fit_forecaster(
            spec,
            train,
            model,
            dict(cfg.forecast),
            epochs=cfg.epochs,
            seed=cfg.seed,
            min_history=cfg.threshold.min_history,
            name="select",
        )
    return common.fit(
        spec,
        train,
        model,
        TrainConfig(epochs=cfg.epochs, seed=cfg.seed),
        min_history=cfg.threshold.min_history,
        name="select",
    )


def _stream(spec: Any, ckpt: Any, train: Any, test: Any, cfg: Any) -> common.Scored:
    scorer = common.make_scorer(
        spec, ckpt, common.make_threshold(ckpt.threshold, cfg), min_history=cfg.threshold.min_history
    )
    common.stream(scorer, train, learn=True, batch_size=cfg.batch_size)
    common.restart_at_test(scorer, test, cfg)
    return common.stream(
        scorer,
        test,
        learn=cfg.learn_in_test,
        learn_scores=cfg.learn_in_test or cfg.learn_scores_in_test,
        batch_size=cfg.batch_size,
    )


def over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One candidate's metrics on one source at several model seeds -> means of F1 (and FAR), with the
    per-seed F1s; a single run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {"f1": float(np.mean([r["f1"] for r in runs])), "f1_seeds": [r["f1"] for r in runs]}
    if all(r.get("far") is not None for r in runs):
        out["far"] = float(np.mean([r["far"] for r in runs]))
    return out


def rank(table: dict[str, dict[str, dict[str, Any]]], max_far: float) -> list[dict[str, Any]]:
    """table[source][candidate] = metrics -> candidates with per-source ranks (1 = best), best first."""
    cands = list(next(iter(table.values())).keys())
    ranks: dict[str, list[float]] = {c: [] for c in cands}
    f1s: dict[str, list[float]] = {c: [] for c in cands}
    spreads: dict[str, list[float]] = {c: [] for c in cands}
    for rows in table.values():
        keys = []
        for c in cands:
            m = rows[c]
            ok = m.get("far") is None or m["far"] <= max_far
            keys.append((1.0 if ok else 0.0) * 10.0 + float(m["f1"]))
            f1s[c].append(float(m["f1"]))
            spreads[c].append(float(np.ptp(m["f1_seeds"])) if m.get("f1_seeds") else 0.0)
        r = scipy.stats.rankdata([-k for k in keys], method="average")
        for c, v in zip(cands, r, strict=True):
            ranks[c].append(float(v))
    out = [
        {
            "candidate": c,
            "mean_rank": float(np.mean(ranks[c])),
            "ranks": ranks[c],
            "mean_f1": float(np.mean(f1s[c])),
            "seed_spread": float(np.mean(spreads[c])),
        }
        for c in cands
    ]
    return sorted(out, key=lambda d: (d["mean_rank"], -d["mean_f1"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate.select", description=__doc__.splitlines()[0])
    ap.add_argument("--source", action="append", default=[], help="skab:PATH[:ROWS] or nasa:PATH")
    ap.add_argument(
        "--rank-logs",
        nargs="+",
        type=Path,
        default=[],
        help="only rank: the per-(source, candidate) JSON lines of earlier runs, pooled",
    )
    ap.add_argument("--model", action="append", default=[], help="JSON config overrides (family, model, forecast)")
    ap.add_argument("--threshold", action="append", default=[], help="JSON threshold overrides (z, smoothing, ...)")
    ap.add_argument(
        "--nasa-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="overrides applied to every nasa source (e.g. z defaults differ per format)",
    )
    ap.add_argument("--skab-set", action="append", default=[], metavar="KEY=JSON")
    ap.add_argument("--max-far", type=float, default=0.15)
    ap.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="train each model candidate at these seeds; rank the means"
    )
    args = ap.parse_args(argv)
    if args.rank_logs:
        pooled: dict[str, dict[str, dict[str, Any]]] = {}
        for log in args.rank_logs:
            for line in log.read_text().splitlines():
                row = json.loads(line) if line.startswith("{") else {}
                if "source" in row:
                    pooled.setdefault(row["source"], {})[row["candidate"]] = row
        common_cands = set.intersection(*(set(v) for v in pooled.values())) if pooled else set()
        for row in rank(
            {src: {c: rows[c] for c in sorted(common_cands)} for src, rows in pooled.items()}, args.max_far
        ):
            print(json.dumps(row), flush=True)
        return 0
    if not args.source:
        print("error: --source (or --rank-logs) is required", file=sys.stderr)
        return 2
    try:
        from pipeline.evaluate import nasa, skab

        models = [json.loads(m) for m in args.model] or [{}]
        thresholds = [json.loads(t) for t in args.threshold] or [{}]
        per = {
            "skab": parse_overrides(args.skab_set, skab.SkabConfig),
            "nasa": parse_overrides(args.nasa_set, nasa.NasaConfig),
        }
        table: dict[str, dict[str, dict[str, Any]]] = {}
        for src in args.source:
            fmt, _, rest = src.partition(":")
            path, _, rows = rest.partition(":")
            if fmt not in ("skab", "nasa") or not path:
                raise ConfigError(f"--source {src!r}: expected skab:PATH[:ROWS] or nasa:PATH")
            table[src] = {}
            for m in models:
                per_seed = []  # [seed][threshold] -> metrics
                train_rows = int(rows) if rows else None
                for seed in args.seeds or [None]:
                    ms = m if seed is None else {**m, "seed": seed}
                    if fmt == "skab":
                        per_seed.append(_skab_runs(Path(path), train_rows, ms, thresholds, per["skab"]))
                    else:
                        per_seed.append(_nasa_runs(Path(path), ms, thresholds, per["nasa"]))
                for i, t in enumerate(thresholds):
                    r = over_seeds([runs[i] for runs in per_seed])
                    cand = json.dumps({**m, **t}, sort_keys=True)
                    table[src][cand] = r
                    keep = {k: r[k] for k in (*REPORTED, "f1_seeds") if k in r}
                    print(json.dumps({"source": src, "candidate": cand, **keep}), flush=True)
        for row in rank(table, args.max_far):
            print(json.dumps(row), flush=True)
    except (ConfigError, json.JSONDecodeError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
