"""NaN and inf: a non-finite loss or gradient skips the step (event `nonfinite_skip`); several in a
row stop the run with a diagnosis (TrainingError, exit 2, event `diverged`); no non-finite weight is
ever saved (adapter, checkpoint) or merged.

Tiny random Llama, in-process: non-finite losses are injected by patching `lorafit.training.loop.loss_sum`
(the loop looks it up at every micro-batch); real divergence comes from learning_rate 1e6.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.config import load_config
from lorafit.errors import TrainingError
from lorafit.training import loop


@pytest.fixture
def data(tmp_path) -> Path:
    p = tmp_path / "data.json"
    p.write_text(json.dumps([{"instruction": f"Spell {i}.", "output": f"{i} is spelt {i}."} for i in range(8)]))
    return p


def _settings(model: str, data: Path, out: Path, **kw) -> dict:
    s = dict(model=model, data=[str(data)], output_dir=str(out), device="cpu", lora_rank=4, lora_alpha=8,
             batch_size=2, max_steps=8, save_steps=1, save_total_limit=20, logging_steps=1, warmup_steps=1,
             max_length=64, eval_steps=1000)
    return {**s, **kw}


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]


def _nan_at(monkeypatch, calls: set[int] | None = None, from_call: int | None = None) -> None:
    """loss_sum returns NaN (still differentiable, so backward runs too) at the given 1-based calls."""
    real = loop.loss_sum
    n = {"calls": 0}

    def patched(*a, **k):
        n["calls"] += 1
        loss, count = real(*a, **k)
        if (calls and n["calls"] in calls) or (from_call and n["calls"] >= from_call):
            loss = loss * float("nan")
        return loss, count

    monkeypatch.setattr(loop, "loss_sum", patched)


def _all_checkpoints_finite(out: Path) -> int:
    n = 0
    for ck in (out / "checkpoints").glob("step-*"):
        for name, t in load_file(str(ck / "trainable.safetensors")).items():
            assert torch.isfinite(t).all(), f"{ck.name}: {name}"
        n += 1
    return n


def test_isolated_nonfinite_steps_are_skipped_and_logged(tiny_model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_at(monkeypatch, calls={3, 5})  # two skips, never two in a row
    res = loop.train(load_config(None, _settings(tiny_model_dir, data, out, max_nonfinite_steps=2)), progress=False)
    log = _log(out)
    skips = [r for r in log if r.get("event") == "nonfinite_skip"]
    assert [(r["step"], r["loss"], r["grad_norm"], r["consecutive"]) for r in skips] == [
        (3, None, None, 1), (5, None, None, 1)]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 4, 6, 7, 8]
    assert all(r["loss"] == r["loss"] for r in log if r["type"] == "train")  # no NaN reached the log
    assert log[-1]["event"] == "end" and res.steps == 8
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert _all_checkpoints_finite(out) >= 1


def test_consecutive_nonfinite_steps_stop_the_run(tiny_model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_at(monkeypatch, from_call=3)
    with pytest.raises(TrainingError, match=r"diverged: 3 consecutive non-finite steps at step 5.*lower learning_rate"):
        loop.train(load_config(None, _settings(tiny_model_dir, data, out)), progress=False)
    log = _log(out)
    skips = [(r["step"], r["consecutive"]) for r in log if r.get("event") == "nonfinite_skip"]
    assert skips == [(3, 1), (4, 2), (5, 3)]
    assert log[-1] == {"type": "event", "step": 5, "event": "diverged", "reason": "3 consecutive non-finite steps"}
    assert not (out / "adapter").exists() and not list(out.glob(".adapter*"))
    assert _all_checkpoints_finite(out) == 2  # steps 1 and 2 only: skipped steps save nothing


def test_huge_learning_rate_diverges_with_exit_2(tiny_model_dir, data, tmp_path, capsys):
    """Real divergence through the CLI: lr 1e6 blows the gradients up after one step."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_settings(tiny_model_dir, data, out, learning_rate=1e6)))
    rc = main(["train", str(cfg), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert "lorafit: error: " in err and "training diverged" in err and "lower learning_rate (e.g. 100000)" in err
    log = _log(out)
    assert [r["event"] for r in log if r["type"] == "event"][-1] == "diverged"
    assert sum(r.get("event") == "nonfinite_skip" for r in log) == 3
    assert not (out / "adapter").exists()
    assert _all_checkpoints_finite(out) >= 1


def test_weights_overflowing_in_a_finite_step_are_not_checkpointed(tiny_model_dir, data, tmp_path):
    """Loss and gradients finite, but the AdamW update itself overflows (absurd lr x weight decay)."""
    out = tmp_path / "run"
    cfg = load_config(None, _settings(tiny_model_dir, data, out, learning_rate=1e30, weight_decay=1e10))
    with pytest.raises(TrainingError, match="non-finite values in adapter weight .*refusing to save checkpoint"):
        loop.train(cfg, progress=False)
    assert not (out / "adapter").exists()
    assert not (out / "checkpoints").exists() or _all_checkpoints_finite(out) == 0


def _run_with_adapter(model_dir: str, data: Path, run: Path, poison: bool) -> None:
    from lorafit.config import save_config
    from lorafit.model import apply_lora, load_model

    cfg = load_config(None, _settings(model_dir, data, run, lora_rank=2))
    peft = apply_lora(load_model(model_dir, device="cpu", dtype="float32"), cfg)
    if poison:
        with torch.no_grad():
            name, p = next((n, p) for n, p in peft.named_parameters() if "lora_B" in n)
            p[0, 0] = float("nan")
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    peft.save_pretrained(str(run / "adapter"))


def test_assert_finite_names_the_tensor(tiny_model_dir, data, tmp_path):
    from lorafit.config import load_config as lc
    from lorafit.model import apply_lora, assert_finite, load_model

    peft = apply_lora(load_model(tiny_model_dir, device="cpu", dtype="float32"),
                      lc(None, _settings(tiny_model_dir, data, tmp_path / "x", lora_rank=2)))
    assert_finite(peft)
    with torch.no_grad():
        name = "base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight"
        dict(peft.named_parameters())[name][0, 1] = float("inf")
    with pytest.raises(TrainingError, match=r"layers\.1\.mlp\.up_proj\.lora_A"):
        assert_finite(peft)


def test_merge_refuses_nonfinite_adapter(tiny_model_dir, data, tmp_path, capsys):
    from lorafit.model import merge

    run, out = tmp_path / "run", tmp_path / "merged"
    _run_with_adapter(tiny_model_dir, data, run, poison=True)
    with pytest.raises(TrainingError, match="lora_B.*non-finite; refusing to merge"):
        merge(run, out)
    assert not out.exists()
    rc = main(["merge", "--run", str(run), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to merge" in err and "Traceback" not in err
    assert not out.exists()


def test_merge_of_finite_adapter_works(tiny_model_dir, data, tmp_path):
    """The control for the refusal above: same run folder, no NaN, merge succeeds."""
    from lorafit.model import merge

    run = tmp_path / "run"
    _run_with_adapter(tiny_model_dir, data, run, poison=False)
    out = merge(run, tmp_path / "merged")
    assert (out / "config.json").is_file()
