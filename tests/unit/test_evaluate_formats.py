"""`pipeline evaluate` end to end on tiny generated datasets in each benchmark's layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from pipeline.errors import ConfigError
from pipeline.evaluate.cli import KEYS, register


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """test root"""

    register(app)
    return app


def _run(fmt: str, data: Path) -> dict:
    res = CliRunner().invoke(_app(), ["evaluate", "--format", fmt, "--data", str(data), "--json", "--epochs", "1"])
    assert res.exit_code == 0, (res.output, res.exception)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _skab(root: Path, rng: np.random.Generator) -> Path:
    (root / "valve1").mkdir(parents=True)
    for i in range(2):
        n = 480
        idx = pd.date_range("2020-03-09 10:00:00", periods=n, freq="s", name="datetime")
        x = rng.normal(0, 1, (n, 3)) + np.sin(np.arange(n) / 10)[:, None]
        y = np.zeros(n)
        y[430:470] = 1
        x[430:470, 0] += 8
        df = pd.DataFrame(x, index=idx, columns=["A", "B", "C"])
        df["anomaly"], df["changepoint"] = y, 0.0
        df.to_csv(root / "valve1" / f"{i}.csv", sep=";")
    return root


def _nasa(root: Path, rng: np.random.Generator) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for chan in ("A-1", "B-2"):
        for part, n in (("train", 260), ("test", 200)):
            x = np.zeros((n, 5))
            x[:, 0] = np.sin(np.arange(n) / 8) * 0.5 + rng.normal(0, 0.02, n)
            x[np.arange(n) % 30 < 3, 1] = 1
            if part == "test":
                x[120:140, 0] = 0.95
            np.save(root / part / f"{chan}.npy", x)
        rows.append(
            {
                "chan_id": chan,
                "spacecraft": "MSL",
                "anomaly_sequences": "[[120, 139]]",
                "class": "[point]",
                "num_values": 200,
            }
        )
    pd.DataFrame(rows).to_csv(root / "labeled_anomalies.csv", index=False)
    return root


def _transactions(root: Path, rng: np.random.Generator) -> Path:
    root.mkdir(parents=True)
    recs = []
    start = pd.Timestamp("2018-04-01")
    for c in range(40):
        mu = rng.uniform(10, 60)
        for t in np.sort(rng.uniform(0, 10 * 86400, 25)):
            fraud = int(t > 8 * 86400 and c < 6)
            amount = abs(rng.normal(mu, mu / 4)) * (5 if fraud else 1)
            recs.append((start + pd.Timedelta(seconds=float(t)), c, int(rng.integers(0, 30)), round(amount, 2), fraud))
    df = pd.DataFrame(recs, columns=["TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD"])
    df = df.sort_values("TX_DATETIME").reset_index(drop=True)
    df.insert(0, "TRANSACTION_ID", range(len(df)))
    df.to_csv(root / "tx.csv.gz", index=False)
    return root


@pytest.mark.parametrize("fmt,make", [("skab", _skab), ("nasa", _nasa), ("transactions", _transactions)])
def test_evaluate_json_keys(tmp_path: Path, fmt: str, make) -> None:  # type: ignore[no-untyped-def]
    data = make(tmp_path / fmt, np.random.default_rng(0))
    out = _run(fmt, data)
    for key in KEYS[fmt]:
        assert key in out
        assert 0.0 <= out[key] <= 1.0


@pytest.mark.parametrize("fmt", sorted(KEYS))
def test_missing_folder_is_a_config_error(tmp_path: Path, fmt: str) -> None:
    res = CliRunner().invoke(_app(), ["evaluate", "--format", fmt, "--data", str(tmp_path / "nope"), "--json"])
    assert isinstance(res.exception, ConfigError)
    assert "nope" in str(res.exception)


def test_wrong_layout_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for fmt in KEYS:
        res = CliRunner().invoke(_app(), ["evaluate", "--format", fmt, "--data", str(tmp_path / "empty")])
        assert isinstance(res.exception, ConfigError), fmt


def test_bad_cells_name_their_column_and_row(tmp_path: Path) -> None:
    head = "TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT,TX_FRAUD\n"
    cases = {
        "tx-amount.csv": (
            head + "1,2018-04-01 00:00:00,1,2,12.5,0\n2,2018-04-02 00:00:00,1,2,abc,0\n",
            "transactions",
            "'TX_AMOUNT' row 2",
        ),
        "tx-time.csv": (head + "1,notadate,1,2,3.0,0\n", "transactions", "'TX_DATETIME' row 1"),
        # a negative amount ended in a NaN traceback from training
        "tx-negative.csv": (
            head + "1,2018-04-01 00:00:00,1,2,12.5,0\n2,2018-04-02 00:00:00,1,2,-1,0\n",
            "transactions",
            "'TX_AMOUNT' row 2 is -1, outside 0 .. 1e+09",
        ),
        "tx-label.csv": (head + "1,2018-04-01 00:00:00,1,2,12.5,2\n", "transactions", "'TX_FRAUD' row 1 is 2"),
    }
    skab_dir = tmp_path / "skab" / "valve1"
    skab_dir.mkdir(parents=True)
    (skab_dir / "0.csv").write_text("datetime;a;b;anomaly;changepoint\n2020-03-09 10:00:00;1.0;x;0;0\n")
    for name, (text, _, _) in cases.items():
        (tmp_path / name).write_text(text)
    checks = [(tmp_path / n, fmt, msg) for n, (_, fmt, msg) in cases.items()]
    checks.append((tmp_path / "skab", "skab", "'b' row 1"))
    for data, fmt, msg in checks:
        res = CliRunner().invoke(_app(), ["evaluate", "--format", fmt, "--data", str(data)])
        assert isinstance(res.exception, ConfigError), (data, res.exception)
        assert msg in str(res.exception)


def test_skab_train_validation_set_uses_training_rows_only(tmp_path: Path) -> None:
    from pipeline.evaluate import skab
    from pipeline.evaluate.validation import skab_train_set

    src = _skab(tmp_path / "src", np.random.default_rng(1))
    out = skab_train_set(src, tmp_path / "val")
    files = sorted((out / "other").glob("*.csv"))
    assert [f.stem for f in files] == ["valve1-0", "valve1-1"]
    for f in files:
        df = skab.read(f)
        orig = skab.read(src / "valve1" / f"{f.stem.split('-')[1]}.csv")
        assert len(df) == 400  # the source's test rows (400+) never appear
        y = df["anomaly"].to_numpy()
        assert y[:250].sum() == 0 and 40 <= y[250:].sum() < 100
        np.testing.assert_allclose(df.iloc[:250, :3].to_numpy(), orig.iloc[:250, :3].to_numpy())
    channels, train, test, labels = skab.load(out, 250)
    assert len(labels) == 2 * 150 and labels.any()


def test_skab_slow_channels_are_found_from_training_rows_only() -> None:
    from pipeline.evaluate.skab import SkabConfig, model_config, slow_channels
    from pipeline.features.streams import EventColumns

    rng = np.random.default_rng(0)
    parts = []
    for e in range(3):
        white = rng.normal(0, 1, (400, 2))
        walk = np.cumsum(rng.normal(0, 1, (400, 1)), axis=0)  # a thermal-like channel: slow drift
        parts.append(EventColumns([f"f{e}"] * 400, np.arange(400.0), np.hstack([white[:, :1], walk, white[:, 1:]])))
    train = EventColumns(
        [i for p in parts for i in p.entity_ids],
        np.concatenate([p.ts for p in parts]),
        np.concatenate([p.base for p in parts]),
    )
    assert slow_channels(train, 0.6) == [1]
    model, slow = model_config(SkabConfig(), train, 3)
    assert slow == [1] and model.score_features == (0, 2)
    everything, none = model_config(SkabConfig(context_autocorr=None), train, 3)
    assert none == [] and everything.score_features is None


def test_model_per_entity_equals_one_run_per_entity(tmp_path: Path) -> None:
    """A model per entity is exactly the shared protocol run on each entity alone, merged back in order."""
    from dataclasses import replace

    from models.lstm_ae import LSTMAEConfig
    from pipeline.evaluate import common, nasa
    from pipeline.features.streams import SensorStream

    chans, train, test, _, _, _ = nasa.load(_nasa(tmp_path / "nasa", np.random.default_rng(1)))
    cfg = replace(
        nasa.NasaConfig(), epochs=1, model={"window": 16, "hidden_size": 8, "latent_size": 4, "score_steps": 4}
    )
    spec, model = SensorStream(nasa.CHANNELS), LSTMAEConfig(n_features=2, **cfg.model)
    merged = common.train_then_score(spec, train, test, model, cfg, name="t", model_per_entity=True)
    shared = common.train_then_score(spec, train, test, model, cfg, name="t")
    test_ids = np.asarray(test.entity_ids)
    train_ids = np.asarray(train.entity_ids)
    for chan in chans:
        te, tr = np.flatnonzero(test_ids == chan), np.flatnonzero(train_ids == chan)
        alone = common.train_then_score(spec, common.take(train, tr), common.take(test, te), model, cfg, name="t")
        np.testing.assert_array_equal(merged.scores[te], alone.scores)
        np.testing.assert_array_equal(merged.alerts[te], alone.alerts)
    assert np.isfinite(merged.scores).all()
    assert not np.array_equal(merged.scores, shared.scores)  # really separate models


def test_model_per_entity_needs_each_entitys_training_part(tmp_path: Path) -> None:
    from models.lstm_ae import LSTMAEConfig
    from pipeline.evaluate import common, nasa
    from pipeline.features.streams import SensorStream

    _, train, test, _, _, _ = nasa.load(_nasa(tmp_path / "nasa", np.random.default_rng(1)))
    only_a = common.take(train, np.flatnonzero(np.asarray(train.entity_ids) == "A-1"))
    with pytest.raises(ConfigError, match="B-2"):
        common.train_then_score(
            SensorStream(nasa.CHANNELS),
            only_a,
            test,
            LSTMAEConfig(n_features=2),
            nasa.NasaConfig(epochs=1),
            name="t",
            model_per_entity=True,
        )


def test_sweep_pools_counts_and_rejects_unknown_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.evaluate import skab, sweep

    data = _skab(tmp_path / "skab", np.random.default_rng(0))
    assert (
        sweep.main(["skab", str(data), f"{data}:420", "--z", "3", "--set", "epochs=1", "--set", 'model={"window": 16}'])
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["data"] for line in lines] == [str(data), f"{data}:420", "pooled"]
    for k in ("tp", "fp", "fn", "tn"):
        assert lines[2][k] == lines[0][k] + lines[1][k]
    # FOLDER:420 trains on 420 rows: the faults (rows 430-469) stay in its test part, 20 normal rows leave it
    assert lines[0]["tp"] + lines[0]["fn"] == lines[1]["tp"] + lines[1]["fn"] == 80
    assert lines[0]["tn"] + lines[0]["fp"] == lines[1]["tn"] + lines[1]["fp"] + 40
    merged = sweep.parse_overrides(['model={"window": 16}'], skab.SkabConfig)["model"]
    assert merged["window"] == 16 and merged["hidden_size"] == skab.SkabConfig().model["hidden_size"]
    assert sweep.main(["skab", str(data), "--z", "3", "--set", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
    assert sweep.main(["skab", f"{data}:many", "--z", "3"]) == 2
    assert "whole number" in capsys.readouterr().err


def test_saved_transactions_model_is_servable_with_label_feedback(tmp_path: Path) -> None:
    from models.lstm_ae import load_checkpoint
    from pipeline.app import build_scorers, label_topics
    from pipeline.config import Settings
    from pipeline.features.streams import TransactionStream

    data = _transactions(tmp_path / "tx", np.random.default_rng(1))
    model = tmp_path / "models" / "transactions.pt"
    res = CliRunner().invoke(
        _app(),
        [
            "evaluate",
            "--format",
            "transactions",
            "--data",
            str(data),
            "--json",
            "--epochs",
            "1",
            "--save-model",
            str(model),
        ],
    )
    assert res.exit_code == 0, (res.output, res.exception)
    ckpt = load_checkpoint(model)
    assert ckpt.card["fraud_feedback_tau_s"] == 3 * 86400.0 and model.with_suffix(".card.json").exists()
    settings = Settings(device="cpu")
    scorers = build_scorers(settings, {"transactions": ckpt})
    spec = scorers[settings.transactions_topic].spec
    assert isinstance(spec, TransactionStream) and spec.label_feedback and spec.n_features == 9
    assert label_topics(settings, scorers) == {settings.labels_topic: settings.transactions_topic}
    nope = CliRunner().invoke(
        _app(), ["evaluate", "--format", "skab", "--data", str(tmp_path), "--save-model", str(model)]
    )
    assert isinstance(nope.exception, ConfigError) and "--save-model" in str(nope.exception)


def test_terminal_context_partitions_travel_with_the_model(tmp_path: Path) -> None:
    from models.lstm_ae import load_checkpoint
    from pipeline.app import build_scorers, check_partitioning, label_topics
    from pipeline.config import Settings

    data = _transactions(tmp_path / "tx", np.random.default_rng(2))
    model = tmp_path / "m" / "transactions.pt"
    out = CliRunner().invoke(
        _app(),
        [
            "evaluate",
            "--format",
            "transactions",
            "--data",
            str(data),
            "--json",
            "--epochs",
            "1",
            "--partitions",
            "2",
            "--save-model",
            str(model),
        ],
    )
    assert out.exit_code == 0, (out.output, out.exception)
    assert json.loads(out.stdout.strip().splitlines()[-1])["partitions"] == 2
    ckpt = load_checkpoint(model)
    assert ckpt.card["terminal_context_partitions"] == 2
    settings = Settings(device="cpu")
    scorers = build_scorers(settings, {"transactions": ckpt})
    labels = label_topics(settings, scorers)
    check_partitioning(settings, scorers, labels, lambda topic: [0, 1])  # as trained: fine
    with pytest.raises(ConfigError, match="--partitions 4"):
        check_partitioning(settings, scorers, labels, lambda topic: [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="same partition count"):
        check_partitioning(
            settings, scorers, labels, lambda topic: [0, 1, 2] if topic == settings.labels_topic else [0, 1]
        )
    for bad in (["--partitions", "0"], ["--format", "nasa", "--partitions", "2"]):
        args = ["evaluate", "--format", "transactions", "--data", str(data), *bad]
        res = CliRunner().invoke(_app(), args)
        assert isinstance(res.exception, ConfigError) and "--partitions" in str(res.exception)


def test_univariate_validation_sets_are_single_column_self_fitted_and_labelled(tmp_path: Path) -> None:
    """The NASA-layout univariate sets: one column, train == test (Orion's fit-and-score-on-itself), labels
    exactly where the injected faults changed the series, readable by the NASA format unchanged."""
    from pipeline.evaluate import nasa
    from pipeline.evaluate.validation import inject_univariate, skab_univariate_set

    rng = np.random.default_rng(3)
    clean = np.sin(np.arange(2000) / 7.0) + rng.normal(0, 0.1, 2000)
    x = clean.copy()
    seqs = inject_univariate(x, np.random.default_rng(0))
    changed = np.flatnonzero(x != clean)
    labelled = np.concatenate([np.arange(a, b + 1) for a, b in seqs])
    assert 1 <= len(seqs) <= 3 and set(changed) <= set(labelled) and changed.size > 0
    assert all(b < 2000 and a >= 200 for a, b in seqs)  # the first tenth stays normal

    src = tmp_path / "skab"
    (src / "anomaly-free").mkdir(parents=True)
    idx = pd.date_range("2020-02-08 13:30:47", periods=500, freq="s", name="datetime")
    pd.DataFrame(rng.normal(0, 1, (500, 2)), index=idx, columns=["a", "b"]).to_csv(
        src / "anomaly-free" / "anomaly-free.csv", sep=";"
    )
    out = skab_univariate_set(src, tmp_path / "uni", chunk=250)
    chans, train, test, labeled, lengths, _ = nasa.load(out)
    assert sorted(chans) == ["skab-0-0", "skab-0-1", "skab-1-0", "skab-1-1"]
    for c in chans:
        a, b = np.load(out / "train" / f"{c}.npy"), np.load(out / "test" / f"{c}.npy")
        assert a.shape == (250, 1) and np.array_equal(a, b) and labeled[c] and lengths[c] == 250


def test_validation_command_bad_kind_or_missing_source_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.evaluate.validation import main

    with pytest.raises(SystemExit) as exit_:
        main(["nope", str(tmp_path), str(tmp_path / "out")])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["skab-uni", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: skab-uni from ") and "anomaly-free.csv" in err and "\n" not in err


def test_a_skab_file_without_sensor_columns_and_cuda_without_a_gpu_are_config_errors(tmp_path: Path) -> None:
    """Found by probing (2026-12-01): both were tracebacks (no channels reached the stream; torch's assertion)."""
    rows = "".join(f"2020-03-09 10:{i // 60:02d}:{i % 60:02d};0;0\n" for i in range(450))
    (tmp_path / "nochan.csv").write_text("datetime;anomaly;changepoint\n" + rows)
    res = CliRunner().invoke(_app(), ["evaluate", "--format", "skab", "--data", str(tmp_path / "nochan.csv")])
    assert isinstance(res.exception, ConfigError) and "nochan.csv: no sensor columns" in str(res.exception)
    import torch

    if not torch.cuda.is_available():
        from pipeline.errors import ScoringError

        res = CliRunner().invoke(_app(), ["evaluate", "--format", "skab", "--data", ".", "--device", "cuda"])
        assert isinstance(res.exception, ScoringError) and "no CUDA device" in str(res.exception)


def _labels(root: Path, *rows: str) -> None:
    head = "chan_id,spacecraft,anomaly_sequences,class,num_values\n"
    (root / "labeled_anomalies.csv").write_text(head + "".join(r + "\n" for r in rows))


def _nasa_case(root: Path, case: str) -> str:
    """Break one thing in a valid NASA folder; -> the words the one-line error must contain."""
    test_a = root / "test" / "A-1.npy"
    x = np.load(test_a)
    if case == "nan":  # one NaN switched detection off on its channel, silently (exit 0)
        x[50, 0] = np.nan
        np.save(test_a, x)
        return "A-1.npy: row 50 column 0 is nan"
    if case == "inf-train":
        y = np.load(root / "train" / "B-2.npy")
        y[7, 2] = np.inf
        np.save(root / "train" / "B-2.npy", y)
        return "B-2.npy: row 7 column 2 is inf"
    if case == "text":
        test_a.write_text("hello")
        return "A-1.npy: not a numeric .npy array"
    if case == "strings":
        np.save(test_a, np.array([["a", "b"]] * 10))
        return "A-1.npy: holds <U1 values"
    if case == "empty":
        np.save(test_a, np.zeros((0, 5)))
        return "A-1.npy: no rows"
    if case == "columns":
        np.save(test_a, x[:, :3])
        return "A-1.npy: 3 columns, but the channel's training series has 5"
    if case == "unclosed":
        _labels(root, 'A-1,MSL,"[[120, 139]",[point],200')
        return "chan_id A-1: anomaly_sequences '[[120, 139]' is not a list of [start, end] pairs"
    if case == "flat":
        _labels(root, 'A-1,MSL,"[120, 139]",[point],200')
        return "is not a list of [start, end] pairs"
    if case == "reversed":
        _labels(root, 'A-1,MSL,"[[139, 120]]",[point],200')
        return "anomaly sequence [139, 120] is outside its test series (indices 0 .. 199) or reversed"
    if case == "beyond":
        _labels(root, 'A-1,MSL,"[[120, 139], [5000, 6000]]",[point],200')
        return "anomaly sequence [5000, 6000] is outside"
    if case == "negative":
        _labels(root, 'A-1,MSL,"[[-50, -10]]",[point],200')
        return "anomaly sequence [-50, -10] is outside"
    if case == "short-train":  # a training part of a few rows was a ValueError traceback (found by probing)
        for chan in ("A-1", "B-2"):
            np.save(root / "train" / f"{chan}.npy", np.load(root / "train" / f"{chan}.npy")[:5])
        return "the training part is too short to train on"
    assert case == "no-labels"
    (root / "labeled_anomalies.csv").write_text("")
    return "labeled_anomalies.csv: not a labels CSV"


@pytest.mark.parametrize(
    "case",
    ["nan", "inf-train", "text", "strings", "empty", "columns", "unclosed", "flat", "reversed", "beyond", "negative",
     "no-labels", "short-train"],
)  # fmt: skip
def test_bad_nasa_inputs_are_one_line_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    root = _nasa(tmp_path / "nasa", np.random.default_rng(0))
    words = _nasa_case(root, case)
    res = CliRunner().invoke(_app(), ["evaluate", "--format", "nasa", "--data", str(root), "--epochs", "1"])
    assert isinstance(res.exception, ConfigError), (case, res.exception)
    assert words in str(res.exception), str(res.exception)


def test_nasa_channels_left_out_are_listed_and_one_chan_id_is_one_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.evaluate import nasa

    root = _nasa(tmp_path / "nasa", np.random.default_rng(0))
    np.save(root / "train" / "C-3.npy", np.zeros((50, 5)))  # a .npy pair without a label row
    np.save(root / "test" / "C-3.npy", np.zeros((50, 5)))
    np.save(root / "test" / "B-2.npy", np.load(root / "test" / "B-2.npy")[:, 0])  # 1-D: the value alone
    np.save(root / "train" / "B-2.npy", np.load(root / "train" / "B-2.npy")[:, 0])
    _labels(
        root,
        'A-1,MSL,"[[120, 139]]",[point],200',
        'A-1,MSL,"[[150, 160], [120, 139]]",[point],200',  # a second row of the same channel adds to it
        'B-2,MSL,"[[190, 200]]",[point],200',  # end one past the series: cut at its last index
        'S-9,SMAP,"[[1, 2]]",[point],10',  # the other spacecraft's row: no files here
    )
    with caplog.at_level("WARNING", logger="pipeline.evaluate.nasa"):
        data = nasa.load(root)
    assert data.channels == ["A-1", "B-2"]
    assert data.labeled == {"A-1": [(120, 139), (150, 160)], "B-2": [(190, 199)]}
    assert data.train.base.shape[1] == 2 and not data.test.base[np.asarray(data.test.entity_ids) == "B-2", 1].any()
    assert set(data.skipped) == {"C-3", "S-9"}
    assert "no row in labeled_anomalies.csv" in data.skipped["C-3"]
    assert "test/S-9.npy" in data.skipped["S-9"]
    assert "2 channel(s) left out" in caplog.text
    out = _run("nasa", root)
    assert out["channels"] == 2 and out["labeled_segments"] == 3 and set(out["skipped_channels"]) == {"C-3", "S-9"}


def test_skab_rows_out_of_time_order_labels_and_mixed_offsets(tmp_path: Path) -> None:
    from pipeline.evaluate import skab

    head = "datetime;a;b;anomaly;changepoint\n"
    rows = [f"2020-03-09 10:00:{s:02d};1.0;2.0;0;0\n" for s in range(5)]
    cases = {
        # reversed rows trained on the latest rows and streamed time backwards (exit 0, wrong F1)
        "reversed.csv": (head + "".join(reversed(rows)), "row 2 (2020-03-09 10:00:03) is not after row 1"),
        "repeated.csv": (head + rows[0] + rows[0], "row 2 (2020-03-09 10:00:00) is not after row 1"),
        "label.csv": (head + rows[0] + rows[1].replace(";0;0", ";7;0"), "'anomaly' row 2 is 7; labels are 0 or 1"),
    }
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=re.escape(words)):
            skab.read(tmp_path / name)
    # offsets that differ are instants all the same (pandas raised "Mixed timezones detected")
    (tmp_path / "offsets.csv").write_text(
        head + "2020-02-08T18:00:00+00:00;1;2;0;0\n2020-02-08T23:00:01+05:00;1;2;0;0\n"
    )
    df = skab.read(tmp_path / "offsets.csv")
    assert (df.index[1] - df.index[0]).total_seconds() == 1.0


def test_skab_reports_context_channels_only_when_some_are_scored() -> None:
    from pipeline.evaluate.skab import SkabConfig, model_config
    from pipeline.features.streams import EventColumns

    walk = np.cumsum(np.random.default_rng(0).normal(0, 1, (400, 2)), axis=0)  # every channel slow
    model, context = model_config(SkabConfig(), EventColumns(["f"] * 400, np.arange(400.0), walk), 2)
    assert model.score_features is None and context == []  # all scored, so none is context


def test_evaluate_json_is_strict_json_with_undefined_metrics_as_null() -> None:
    """A probe: `evaluate --format transactions --json` on a test part without frauds printed `"roc_auc": NaN`,
    which JSON.parse and strict parsers refuse."""
    import json
    import math

    from pipeline.evaluate.cli import _finite

    res = {"roc_auc": math.nan, "f1": 0.5, "per": {"a": math.inf, "b": [1.0, -math.inf]}, "n": 3}
    text = json.dumps(_finite(res), allow_nan=False)
    assert json.loads(text) == {"roc_auc": None, "f1": 0.5, "per": {"a": None, "b": [1.0, None]}, "n": 3}


def test_skab_data_under_a_folder_named_anomaly_free_is_read(tmp_path: Path) -> None:
    """A probe: any --data path running through a folder named anomaly-free was ignored whole ("no SKAB CSVs");
    only SKAB's own anomaly-free/ inside --data is left out."""
    from pipeline.evaluate.skab import find_files

    mine = tmp_path / "anomaly-free" / "myset"
    (mine / "anomaly-free").mkdir(parents=True)
    (mine / "1.csv").write_text("datetime;x;anomaly;changepoint\n")
    (mine / "anomaly-free" / "anomaly-free.csv").write_text("datetime;x\n")
    assert find_files(mine) == [mine / "1.csv"]
