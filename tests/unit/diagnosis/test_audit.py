"""Regressions from an audit of `lorafit diagnose`: overfitting from the first evaluation or with two
evaluations, numbers that are not counts where counts belong, malformed side files and launch YAMLs,
--write-config targets, BOMs, coarse logging of a warmup, and the cost of wide rolling medians."""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from lorafit.cli import main
from lorafit.config import load_config, save_config
from lorafit.diagnosis import diagnose_records, diagnose_run, load_source
from lorafit.diagnosis.stats import ols_slope, rolling_median


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)   # json.dumps writes NaN/Infinity as JS does


def falling_train(T: int = 1000, L: int = 10, lr: float = 2e-4) -> list[dict]:
    """Training loss falling steadily 2.0 -> 0.1 (the audit's curve), constant LR."""
    return [{"type": "train", "step": s, "loss": 0.1 + 1.9 * math.exp(-6 * s / 1000), "lr": lr, "epoch": 3 * s / T}
            for s in range(L, T + 1, L)]


def evals(points: dict[int, float], split: str = "val") -> list[dict]:
    return [{"type": "eval", "step": s, "split": split, "eval_loss": v} for s, v in points.items()]


def kinds(findings, at_least=("warning", "critical")) -> set[str]:
    return {f.kind for f in findings if f.severity in at_least}


def hf_history(T: int = 1000, L: int = 10) -> list[dict]:
    return [{"step": r["step"], "loss": r["loss"], "learning_rate": r["lr"], "epoch": r["epoch"], "grad_norm": 1.0}
            for r in falling_train(T, L)] + [{"step": s, "eval_loss": 1.5 - 0.2 * s / T} for s in range(100, T + 1, 100)]


# --- 1, 2: overfitting the "best is the first evaluation" rule used to hide --------------------------
def test_validation_rising_from_its_first_evaluation_while_train_falls_is_overfitting():
    rising = {s: 1.2 + 0.8 * (s - 100) / 900 for s in range(100, 1001, 100)}
    over = [f for f in diagnose_records(falling_train() + evals(rising)) if f.kind == "overfitting"]
    assert over and over[0].severity == "critical" and over[0].evidence["best_step"] == 100
    assert "first evaluation" in over[0].summary
    # with a step-0 evaluation it was already found, and still is
    assert "overfitting" in kinds(diagnose_records(falling_train() + evals({0: 2.1, **rising})))


def test_a_diverging_run_is_still_not_called_overfitting():
    rising = {s: 1.2 + 0.8 * (s - 100) / 900 for s in range(100, 1001, 100)}
    train = [{**r, "loss": 1.0 + 2.0 * r["step"] / 1000} for r in falling_train()]   # training rose too
    assert "overfitting" not in {f.kind for f in diagnose_records(train + evals(rising))}


def test_two_evaluations_that_rose_sharply_are_not_an_all_clear():
    f = diagnose_records(falling_train() + evals({500: 1.1, 1000: 2.0}))
    over = [x for x in f if x.kind == "overfitting"]
    assert over and "only 2 evaluations" in over[0].summary and over[0].evidence["rise_from_best"] > 0.8


# --- 3, 10: numbers that are not counts --------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e300])
def test_hf_step_and_max_steps_that_are_not_counts_skip_or_are_unknown(tmp_path, capsys, bad):
    hist = hf_history()
    hist.insert(5, {"step": bad, "loss": 1.0, "learning_rate": 2e-4})
    state = write(tmp_path / "trainer_state.json", json.dumps({"log_history": hist, "max_steps": bad,
                                                               "logging_steps": bad}))
    rc, out, err = cli(capsys, "diagnose", state)
    assert rc == 0 and "Traceback" not in err, err
    steps = [r["step"] for r in load_source(state).records if r["type"] == "train"]
    assert len(steps) == 100 and all(isinstance(s, int) for s in steps)   # the bad entry is skipped


@pytest.mark.parametrize("field", ["current_steps", "total_steps"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_llamafactory_steps_that_are_not_counts(tmp_path, capsys, field, bad):
    lines = [{"current_steps": r["step"], "total_steps": 1000, "loss": r["loss"], "lr": r["lr"]} for r in falling_train()]
    lines[3][field] = lines[-1][field] = bad
    rc, _, err = cli(capsys, "diagnose", write(tmp_path / "trainer_log.jsonl", jsonl(lines)))
    assert rc == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("start", [{"total_steps": math.inf}, {"effective_warmup_steps": math.nan},
                                   {"logging_steps": math.inf}, {"logging_steps": 1e300},
                                   {"truncated_examples": math.inf, "train_examples": math.nan}])
def test_lorafit_start_event_values_that_are_not_counts_are_unknown(tmp_path, capsys, start):
    rng = np.random.default_rng(0)
    noisy = [{**r, "loss": r["loss"] * math.exp(rng.normal(0, 0.05))} for r in falling_train()]
    rows = [{"type": "event", "step": 0, "event": "start", **start}] + noisy + evals({500: 1.0, 1000: 0.9})
    rc, out, err = cli(capsys, "diagnose", write(tmp_path / "log.jsonl", jsonl(rows)))
    assert rc == 0 and "Traceback" not in err, err
    found = json.loads((tmp_path / "diagnosis.json").read_text())
    assert not [f for f in found if f["evidence"].get("noise_per_step", 0) > 1]   # no ±10^150 % noise figure


def test_ols_slope_of_degenerate_steps():
    assert ols_slope(np.array([1e300, 1e300 * (1 + 1e-16), 1e300]), np.array([1.0, 2.0, 3.0])) == (0.0, math.inf)
    assert ols_slope(np.array([0.0, np.inf, 1.0]), np.array([1.0, 2.0, 3.0]))[1] == math.inf


@pytest.mark.parametrize("odd", [0.0, -1.0, 1e308])
def test_eval_losses_that_are_not_losses_give_no_absurd_rise_or_warning(odd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = diagnose_records(falling_train() + evals({s: (odd if s == 300 else 1.0 - s / 2000) for s in range(100, 1001, 100)})
                             + evals({s: odd for s in range(100, 1001, 100)}, "other")
                             + evals({s: 10.0 ** -(300 + s // 100) for s in range(100, 1001, 100)}, "tiny"))
    assert not kinds(f) and all("inf" not in x.summary for x in f)


def test_checkpoint_folder_with_a_non_ascii_digit_and_a_device(tmp_path, capsys):
    write(tmp_path / "checkpoint-²" / "trainer_state.json", json.dumps({"log_history": hf_history()}))
    rc, _, err = cli(capsys, "diagnose", tmp_path)
    assert rc == 2 and "no training log in this folder" in err
    write(tmp_path / "checkpoint-20" / "trainer_state.json", json.dumps({"log_history": hf_history()}))
    assert cli(capsys, "diagnose", tmp_path)[0] == 0
    rc, _, err = cli(capsys, "diagnose", "/dev/null")
    assert rc == 2 and "not a log file or folder" in err and err.count("\n") == 1


# --- 4, 5: malformed launch YAML and side files ------------------------------------------------------
@pytest.mark.parametrize("value", ["5", "true", "{a: 1}"])
def test_eval_dataset_that_is_not_names_is_exit_2(tmp_path, capsys, value):
    write(tmp_path / "trainer_log.jsonl", jsonl([{"current_steps": r["step"], "total_steps": 1000, "loss": r["loss"]}
                                                 for r in falling_train()]))
    write(tmp_path / "training_args.yaml", f"learning_rate: 1.0e-4\neval_dataset: {value}\n")
    rc, out, err = cli(capsys, "diagnose", tmp_path)
    assert rc == 2 and out == "" and "training_args.yaml:2" in err and "field 'eval_dataset'" in err
    write(tmp_path / "training_args.yaml", "eval_dataset: a, b\n")   # LLaMA-Factory's comma-separated form
    assert load_source(tmp_path).config["val_data"] == {"a": "a", "b": "b"}


@pytest.mark.parametrize("metrics", ['{"sets": [1, 2]}', '{"sets": {"general": [1]}}',
                                     '{"sets": {"general": {"before": [1], "delta": 3, "loss_before": NaN}}}',
                                     '{"sets": {"x": {"health": {"before": {}, "after": {"n": "a", "examples": 3}}}}}',
                                     '{"benchmarks": {"mmlu": {"5-shot": {"overall": {"delta": NaN}}}}}'])
def test_malformed_metrics_json_counts_as_absent(tmp_path, metrics):
    write(tmp_path / "log.jsonl", jsonl(falling_train() + evals({500: 1.0, 1000: 0.9})))
    write(tmp_path / "eval" / "metrics.json", metrics)
    assert "forgetting" not in {f.kind for f in diagnose_run(tmp_path)}
    json.loads((tmp_path / "diagnosis.json").read_text())


# --- 6: --write-config targets -----------------------------------------------------------------------
def _targets(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "adir").mkdir()
    write(tmp_path / "afile", "x")
    return {"an existing folder": tmp_path / "adir", "under a file": tmp_path / "afile" / "fixed.yaml",
            "under /proc": Path("/proc/lorafit-no-such/fixed.yaml")}


@pytest.mark.parametrize("tool", ["lorafit", "hf"])
def test_write_config_to_a_bad_target_is_exit_2_and_writes_nothing(tmp_path, capsys, tool):
    run = tmp_path / "run"
    if tool == "lorafit":
        write(run / "log.jsonl", jsonl(falling_train() + evals({s: 1.2 + s / 1000 for s in range(100, 1001, 100)})))
        save_config(load_config(overrides={"model": "x", "data": ["y.json"]}), write(run / "config.yaml", ""))
    else:
        write(run / "trainer_state.json", json.dumps({"log_history": hf_history()}))
    for what, target in _targets(tmp_path).items():
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        rc, out, err = cli(capsys, "diagnose", run, "--write-config", target)
        assert rc == 2 and err.count("\n") == 1 and str(target) in err and "Traceback" not in err, (what, err)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before, what   # no diagnosis.json, no temp file


# --- 8: byte-order marks -----------------------------------------------------------------------------
def test_a_bom_does_not_hide_the_first_record(tmp_path):
    bom = "\ufeff"
    rows = [{"type": "event", "step": 0, "event": "start", "total_steps": 5000}] + falling_train()
    write(tmp_path / "lo" / "log.jsonl", (bom + jsonl(rows)).encode())
    assert load_source(tmp_path / "lo").records[0]["event"] == "start"
    lf = [{"current_steps": r["step"], "total_steps": 1000, "loss": r["loss"]} for r in falling_train()]
    write(tmp_path / "lf" / "trainer_log.jsonl", (bom + jsonl(lf)).encode())
    assert sum(r["type"] == "train" for r in load_source(tmp_path / "lf").records) == 100
    write(tmp_path / "hf" / "trainer_state.json", (bom + json.dumps({"log_history": hf_history()})).encode())
    assert sum(r["type"] == "train" for r in load_source(tmp_path / "hf").records) == 100


# --- 9: a warmup shorter than the logging interval ---------------------------------------------------
def test_coarse_logging_does_not_claim_zero_warmup(tmp_path):
    T, W, L = 3000, 90, 100
    lr = lambda s: 2e-4 * (s / W if s < W else 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W))))  # noqa: E731
    hist = [{"step": s, "loss": 0.8 + 1.2 * math.exp(-s / 600), "learning_rate": lr(s), "epoch": s / 1000}
            for s in range(L, T + 1, L)]
    state = write(tmp_path / "trainer_state.json", json.dumps({"log_history": hist, "max_steps": T, "logging_steps": L}))
    assert "warmup_too_short" not in {f.kind for f in diagnose_run(state)}
    write(tmp_path / "launch.yaml", f"learning_rate: 2.0e-4\nwarmup_steps: {W}\nlr_scheduler_type: cosine\n")
    assert load_source(state, tmp_path / "launch.yaml").config["effective_warmup_steps"] == W
    # logged every 10 steps at the peak LR from the first record: "at most 10", not "0"
    hist = [{"step": s, "loss": 0.8 + 1.2 * math.exp(-s / 600), "learning_rate": 2e-4} for s in range(10, T + 1, 10)]
    warm = [f for f in diagnose_run(write(tmp_path / "c" / "trainer_state.json", json.dumps({"log_history": hist})))
            if f.kind == "warmup_too_short"]
    assert warm and "at most 10 steps" in warm[0].summary


# --- 7: a long log ---------------------------------------------------------------------------------------
def test_rolling_median_is_exact_on_small_logs_and_close_when_strided(monkeypatch):
    from numpy.lib.stride_tricks import sliding_window_view

    from lorafit.diagnosis import stats

    rng = np.random.default_rng(0)
    x = rng.normal(size=3000)
    x[rng.random(3000) < 0.05] = np.nan
    for before, after, k in [(0, 0, 1), (1, 1, 2), (24, 0, 3), (0, 24, 3), (375, 375, 188)]:
        w = sliding_window_view(np.concatenate([np.full(before, np.nan), x, np.full(after, np.nan)]), before + after + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.nanmedian(w, axis=1)
        ref[np.isfinite(w).sum(axis=1) < k] = np.nan
        np.testing.assert_allclose(rolling_median(x, before, after, k), ref, equal_nan=True)
    monkeypatch.setattr(stats, "MEDIAN_BUDGET", 3000 * 751 // 20)   # a stride of 20 records
    y = np.cumsum(rng.normal(size=3000)) * 0.01 + rng.normal(size=3000)
    exact = np.median(sliding_window_view(np.pad(y, 375, mode="edge"), 751), axis=1)
    assert np.nanmax(np.abs(rolling_median(y, 375, 375)[375:-375] - exact[375:-375])) < 0.05


def test_a_200k_record_log_is_diagnosed_in_seconds():
    rng = np.random.default_rng(1)
    n = 200_000
    s = np.arange(1, n + 1)
    loss = (0.8 + 1.2 * np.exp(-3 * s / n)) * np.exp(rng.normal(0, 0.05, n))
    recs = [{"type": "train", "step": int(a), "loss": float(b), "lr": 2e-4, "grad_norm": float(g)}
            for a, b, g in zip(s, loss, np.abs(rng.normal(1, 0.1, n)))]
    t = time.perf_counter()
    f = diagnose_records(recs, config={"logging_steps": 1})
    assert time.perf_counter() - t < 20   # it took 70+ s when wide windows were sorted record by record
    assert not kinds(f)
