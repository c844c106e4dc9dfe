"""lorafit.diagnosis: each detector on small crafted logs (positive and negative), the run-folder
contract (diagnosis.json, --write-config), and robustness to partial or older logs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lorafit.config import load_config, save_config
from lorafit.diagnosis import diagnose_records, diagnose_run, format_findings, merge_patches
from lorafit.diagnosis.findings import Finding
from lorafit.diagnosis.synthetic import SCORED_KINDS, benchmark_suite, generate
from lorafit.errors import RunError

CFG = {"batch_size": 4, "gradient_accumulation_steps": 2, "logging_steps": 10, "eval_steps": 100,
       "learning_rate": 1e-4, "lr_scheduler": "cosine", "warmup_steps": 20, "warmup_ratio": 0.1,
       "max_grad_norm": 1.0, "lora_dropout": 0.1, "num_epochs": 3, "total_steps": 3000,
       "effective_warmup_steps": 300}


def make_log(T: int = 3000, L: int = 10, M: int = 100, noise: float = 0.03, lr: float = 1e-4, warm: int = 300,
             decay: float = 600.0, seed: int = 0, val: bool = True, val_fn=None, train_fn=None,
             grad_fn=None, general_fn=None) -> list[dict]:
    """A healthy exponential-decay run (cosine LR) that tests bend into each problem."""
    rng = np.random.default_rng(seed)
    recs: list[dict] = [{"type": "event", "step": 0, "event": "start", "effective_warmup_steps": warm, "total_steps": T}]
    for s in range(L, T + 1, L):
        lr_s = lr * s / warm if s < warm else lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (T - warm)))
        loss = 0.6 + 1.4 * math.exp(-s / decay)
        loss = train_fn(s, loss) if train_fn else loss
        g = grad_fn(s) if grad_fn else 1.0
        recs.append({"type": "train", "step": s, "epoch": 3 * s / T, "loss": loss * math.exp(rng.normal(0, noise)),
                     "lr": lr_s, "grad_norm": g * math.exp(rng.normal(0, 0.1)), "tokens_per_s": 1000.0})
        if val and s % M == 0:
            v = 0.7 + 1.3 * math.exp(-s / (decay * 2))
            v = val_fn(s, v) if val_fn else v
            recs.append({"type": "eval", "step": s, "split": "val", "eval_loss": v * math.exp(rng.normal(0, 0.002))})
            if general_fn:
                recs.append({"type": "eval", "step": s, "split": "general", "eval_loss": general_fn(s)})
    recs.append({"type": "event", "step": T, "event": "end"})
    return recs


def kinds(findings: list[Finding], at_least: str = "warning") -> set[str]:
    from lorafit.diagnosis.findings import SEVERITIES

    return {f.kind for f in findings if SEVERITIES.index(f.severity) >= SEVERITIES.index(at_least)}


def by_kind(findings: list[Finding], kind: str) -> Finding:
    return next(f for f in findings if f.kind == kind)


def test_healthy_run_has_no_problems():
    assert kinds(diagnose_records(make_log(), config=CFG)) == set()


# --- fluctuation ---------------------------------------------------------------------------------
def test_spikes_are_found_at_their_steps():
    spikes = {200: 3.0, 400: 2.5, 1400: 2.0, 2000: 4.0}
    recs = make_log(train_fn=lambda s, l: l * spikes.get(s, 1.0))
    f = by_kind(diagnose_records(recs, config=CFG), "fluctuation")
    assert f.severity in ("warning", "critical")
    assert sorted(f.steps) == [200, 400, 1400, 2000]
    ratios = {p["step"]: p["ratio"] for p in f.evidence["spikes"]}
    assert ratios[2000] == pytest.approx(4.0, rel=0.15)
    assert f.config_patch["learning_rate"] == pytest.approx(5e-5)


def test_noisy_small_batch_is_info_not_a_spike():
    cfg = {**CFG, "batch_size": 1, "gradient_accumulation_steps": 1, "logging_steps": 1}
    findings = diagnose_records(make_log(L=1, M=100, T=1500, noise=0.3), config=cfg)
    assert "fluctuation" not in kinds(findings)
    f = by_kind(findings, "fluctuation")
    assert f.severity == "info" and f.config_patch["gradient_accumulation_steps"] > 1


# --- divergence ----------------------------------------------------------------------------------
def test_divergence_rising_loss_is_critical():
    recs = make_log(train_fn=lambda s, l: l * (1 if s < 1500 else math.exp(min(1.0, (s - 1500) / 300) * 1.6)))
    f = by_kind(diagnose_records(recs, config=CFG), "divergence")
    assert f.severity == "critical" and 1300 <= f.steps[0] <= 1600
    assert f.config_patch["learning_rate"] == pytest.approx(3e-5)
    assert "fluctuation" not in kinds(diagnose_records(recs, config=CFG))   # the rise is not a "spike"


def test_nonfinite_losses_are_reported():
    recs = make_log()
    for r in recs:
        if r.get("step") in (700, 710) and r["type"] == "train":
            r["loss"] = float("nan")
    recs.append({"type": "event", "step": 700, "event": "nonfinite_skip"})
    f = by_kind(diagnose_records(recs, config={**CFG, "dtype": "float16"}), "divergence")
    assert f.evidence["nonfinite_count"] == 2 and f.config_patch["dtype"] == "bfloat16"


# --- flat loss / LR too low ----------------------------------------------------------------------
def test_flat_loss_with_low_lr():
    recs = make_log(lr=1e-6, train_fn=lambda s, l: 2.0 - 0.02 * s / 3000,
                    val_fn=lambda s, v: 2.1 - 0.01 * s / 3000)
    findings = diagnose_records(recs, config={**CFG, "learning_rate": 1e-6})
    f = by_kind(findings, "lr_too_low")
    assert f.severity == "warning" and f.config_patch["learning_rate"] == pytest.approx(1e-4)
    assert "plateau" not in kinds(findings)   # never fell: not a plateau


# --- gradient norm -------------------------------------------------------------------------------
def test_grad_norm_explosion():
    recs = make_log(grad_fn=lambda s: 80.0 if s in (1200, 2500) else 1.0)
    f = by_kind(diagnose_records(recs, config={**CFG, "max_grad_norm": 0.0}), "grad_explosion")
    assert f.steps == [1200, 2500] and f.config_patch["max_grad_norm"] == 1.0
    assert "grad_explosion" not in kinds(diagnose_records(make_log(), config=CFG))


# --- warmup --------------------------------------------------------------------------------------
def test_warmup_too_short_with_early_bump():
    bump = lambda s, l: l * (1 + 0.8 * math.exp(-0.5 * ((s - 60) / 20) ** 2))
    recs = make_log(warm=0, lr=6e-4, train_fn=bump)
    cfg = {**CFG, "effective_warmup_steps": 0, "warmup_steps": 0, "warmup_ratio": 0.0, "learning_rate": 6e-4}
    f = by_kind(diagnose_records(recs, config=cfg), "warmup_too_short")
    assert f.severity == "warning" and f.config_patch["warmup_ratio"] == 0.1
    # the same bump with a proper warmup is not blamed on warmup
    assert "warmup_too_short" not in kinds(diagnose_records(make_log(train_fn=bump), config=CFG))


# --- plateau -------------------------------------------------------------------------------------
def test_plateau_on_constant_lr():
    cfg = {**CFG, "lr_scheduler": "constant"}
    recs = [r for r in make_log(val_fn=lambda s, v: 0.9 + 1.1 * math.exp(-s / 200)) if True]
    for r in recs:
        if r["type"] == "train":
            r["lr"] = 1e-4
    f = by_kind(diagnose_records(recs, config=cfg), "plateau")
    assert f.evidence["split"] == "val" and f.steps[0] <= 1500
    healthy = make_log(val_fn=lambda s, v: 0.7 + 1.3 * math.exp(-s / 3000))
    assert "plateau" not in kinds(diagnose_records(healthy, config=cfg))


def test_flattening_while_lr_anneals_is_not_a_plateau():
    # cosine LR: the last quarter of the steps holds ~2% of the LR integral, so a flat tail is expected
    recs = make_log(val_fn=lambda s, v: 0.7 + 1.3 * math.exp(-(1 - math.cos(math.pi * s / 3000)) * 1.2))
    assert "plateau" not in kinds(diagnose_records(recs, config=CFG))


# --- overfitting ---------------------------------------------------------------------------------
def test_overfitting_best_step_and_patch():
    recs = make_log(val_fn=lambda s, v: v * (1 + 0.25 * max(0, s - 1800) / 1200),
                    train_fn=lambda s, l: l * (1 - 0.2 * max(0, s - 1800) / 1200))
    findings = diagnose_records(recs, config=CFG)
    f = by_kind(findings, "overfitting")
    assert 1800 <= f.evidence["best_step"] <= 2300   # the base curve still falls a little after 1800
    assert f.evidence["gap_final"] > f.evidence["gap_at_best"]
    assert f.config_patch["early_stopping_patience"] == 3
    assert f.config_patch["num_epochs"] == pytest.approx(math.ceil(f.evidence["epoch_at_best"] * 10) / 10)
    assert f.config_patch["augment"] == ["prompt_variants", "word_dropout"]
    assert "plateau" not in kinds(findings)


def test_overfitting_with_early_stopping_is_not_critical():
    recs = make_log(val_fn=lambda s, v: v * (1 + 0.25 * max(0, s - 1800) / 1200))
    f = by_kind(diagnose_records(recs, config={**CFG, "early_stopping_patience": 2}), "overfitting")
    assert f.severity == "warning" and f.evidence["best_adapter_restored"]
    assert "early_stopping_patience" not in f.config_patch


def test_overfitting_with_few_evaluations():
    ys = {750: 1.30, 1500: 1.10, 2250: 1.16, 3000: 1.25}
    recs = [r for r in make_log(val=False)] + [{"type": "eval", "step": s, "split": "val", "eval_loss": v}
                                              for s, v in ys.items()]
    f = by_kind(diagnose_records(recs, config=CFG), "overfitting")
    assert f.evidence["best_step"] == 1500


def test_noisy_flat_validation_is_not_overfitting():
    rng = np.random.default_rng(1)
    recs = make_log(val_fn=lambda s, v: 1.5 * math.exp(rng.normal(0, 0.005)))
    assert "overfitting" not in kinds(diagnose_records(recs, config=CFG))


# --- forgetting ----------------------------------------------------------------------------------
def test_forgetting_from_general_split():
    recs = make_log(general_fn=lambda s: 2.0 * (1 + 0.12 * s / 3000))
    f = by_kind(diagnose_records(recs, config={**CFG, "general_data": ["/g.json"]}), "forgetting")
    assert f.evidence["general_loss_rise"] == pytest.approx(0.12, abs=0.01)
    assert f.config_patch == {"general_ratio": 0.2, "learning_rate": 1e-5, "num_epochs": 1}
    ok = make_log(general_fn=lambda s: 2.0 * (1 + 0.01 * s / 3000))
    assert "forgetting" not in kinds(diagnose_records(ok, config=CFG), at_least="info")
    drift = make_log(general_fn=lambda s: 2.0 * (1 + 0.04 * s / 3000))   # a real SmolLM2 run drifted 4.1%
    assert by_kind(diagnose_records(drift, config=CFG), "forgetting").severity == "info"


def test_forgetting_from_metrics_json():
    metrics = {"mode": "llamafactory", "sets": {"general": {
        "lang": "zh", "n": 50, "loss_before": 2.0, "loss_after": 2.05,
        "before": {"rouge-l": 30.0}, "after": {"rouge-l": 24.0}, "delta": {"rouge-l": -6.0}}}}
    f = by_kind(diagnose_records(make_log(), metrics, CFG), "forgetting")
    assert f.severity == "critical" and f.evidence["rouge_l_delta"] == -6.0
    assert "general_ratio" not in f.config_patch   # no general_data to mix: the fix text says what to add


# --- robustness ----------------------------------------------------------------------------------
def test_old_partial_and_resumed_logs():
    recs = make_log()
    for r in recs:
        r.pop("lr", None)
        r.pop("grad_norm", None)
    recs += [{"type": "train", "step": 100, "loss": 1.0}, {"type": "train"}, {"type": "eval", "step": 5}, {"x": 1}]
    assert kinds(diagnose_records(recs)) == set()          # no config, no LR, duplicates, junk records
    assert [f.kind for f in diagnose_records([])] == ["insufficient_data"]   # never an empty (all-clear) answer
    assert kinds(diagnose_records(make_log(T=30, L=10, M=10))) == set()   # 3 train records


def test_diagnose_run_writes_json_and_patched_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(overrides={"model": "x", "data": ["y.json"], "learning_rate": 1e-4}), run / "config.yaml")
    recs = make_log(val_fn=lambda s, v: v * (1 + 0.25 * max(0, s - 1800) / 1200),
                    train_fn=lambda s, l: l * {1400: 3.0}.get(s, 1.0))
    lines = [json.dumps(r) for r in recs]
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"type": "train", "st', encoding="utf-8")
    out = tmp_path / "fixed.yaml"
    findings = diagnose_run(run, write_config=str(out))
    data = json.loads((run / "diagnosis.json").read_text())
    assert [d["kind"] for d in data] == [f.kind for f in findings]
    assert set(data[0]) == {"kind", "severity", "summary", "explanation", "fix", "steps", "evidence", "config_patch"}
    cfg = load_config(out)
    patch = merge_patches(findings)
    assert cfg.learning_rate == patch["learning_rate"] == 5e-5   # min over findings
    assert cfg.early_stopping_patience == 3 and cfg.augment == ["prompt_variants", "word_dropout"]
    assert cfg.model == "x"
    text = format_findings(findings)
    assert "overfitting" in text and "Fix:" in text


def test_write_config_needs_config_yaml(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps(make_log()[1]) + "\n")
    assert [f.kind for f in diagnose_run(tmp_path)] == ["no_validation", "insufficient_data"]   # info only
    with pytest.raises(RunError):
        diagnose_run(tmp_path, write_config=str(tmp_path / "x.yaml"))
    with pytest.raises(RunError):
        diagnose_run(tmp_path / "missing")


# --- the synthetic generator ---------------------------------------------------------------------
def test_generator_plants_requested_events():
    rng = np.random.default_rng(0)
    run = generate(rng, {"fluctuation"}, spike_steps=[200, 400, 1400, 2000])
    assert run.spike_steps == [200, 400, 1400, 2000] and run.truth == {"fluctuation"}
    f = by_kind(diagnose_records(run.records, run.metrics, run.config), "fluctuation")
    L = run.params["logging_steps"]
    assert all(any(abs(s - p) <= L for s in f.steps) for p in run.spike_steps)
    suite = benchmark_suite(seed=1, per_kind=1, healthy=2)
    assert {k for r in suite for k in r.truth} == set(SCORED_KINDS)


def test_overfitting_at_a_high_lr_names_the_lr():
    over = dict(val_fn=lambda s, v: v * (1 + 0.25 * max(0, s - 1800) / 1200),
                train_fn=lambda s, l: l * (1 - 0.2 * max(0, s - 1800) / 1200))
    high = by_kind(diagnose_records(make_log(lr=1e-3, **over), config={**CFG, "learning_rate": 1e-3}), "overfitting")
    assert high.config_patch["learning_rate"] == pytest.approx(1e-4)
    assert "peak LR 0.001" in high.fix
    usual = by_kind(diagnose_records(make_log(**over), config=CFG), "overfitting")
    assert "learning_rate" not in usual.config_patch
