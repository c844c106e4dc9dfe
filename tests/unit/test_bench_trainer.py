"""benchmarks/bench_trainer.py and its other-trainer rows (benchmarks/hf_rows.py) on CPU with a tiny random
model: the HF Trainer row and `lorafit train` see the same first micro-batch (same loss before any update),
TRL's SFTTrainer row does too, and Liger Kernel patches the PEFT model as HF Trainer applies it. The TRL and
Liger tests need those packages (benchmarks/device_bench.sh wheels; not in the dev extras): they skip
where they are missing."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HF_ROWS = ROOT / "benchmarks" / "hf_rows.py"


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: tiny models gain nothing from two, and lose much when the cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _module(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/NAME.py` has it
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def data_dir(tmp_path) -> Path:
    rows = [{"instruction": f"How do I {w} order {i}?", "input": "",
             "output": f"To {w} order {i}, open your account, pick the order and choose '{w}'. " * (1 + i % 3)}
            for i, w in enumerate(["cancel", "track", "change", "return"] * 4)]
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(rows))
    return d


def _config(tmp_path: Path, model: str, data_dir: Path, steps: int = 3) -> Path:
    p = tmp_path / "row.yaml"
    p.write_text(yaml.safe_dump({"model": model, "data": [str(data_dir / "train.json")], "max_steps": steps,
                                 "logging_steps": 1, "seed": 0, "device": "cpu", "output_dir": str(tmp_path / "unused")}))
    return p


def _subprocess_row(row: str, cfg: Path, work: Path) -> dict:
    """A row as bench_trainer runs it: its own process. TRL's log-prob and Liger's kernels are Triton
    kernels, which run on a CPU only through Triton's interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(HF_ROWS), row, str(cfg), str(work)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((work / f"{row}.json").read_text())


def test_hf_row_and_lorafit_see_the_same_first_batch(tmp_path, monkeypatch, tiny_model_dir, data_dir):
    rows = _module("hf_rows", monkeypatch)
    cfg = _config(tmp_path, tiny_model_dir, data_dir)
    res = rows.run_row("hf", cfg, tmp_path / "work")
    assert [s for s, _ in res["losses"]] == [1, 2, 3] and len(res["tokens_per_s"]) == 3
    assert json.loads((tmp_path / "work" / "hf.json").read_text())["losses"] == [list(x) for x in res["losses"]]

    import lorafit

    run = lorafit.train(cfg, {"output_dir": str(tmp_path / "lorafit"), "fused_kernels": False}, progress=False, plot=False)
    first = next(json.loads(line) for line in (run.run_dir / "log.jsonl").read_text().splitlines()
                 if json.loads(line)["type"] == "train")
    assert first["loss"] == pytest.approx(res["losses"][0][1], rel=1e-4)  # LoRA B starts at 0: the base's loss


@pytest.mark.slow  # TRL's log-prob kernel runs in Triton's interpreter: about a minute on two cores
def test_trl_row_sees_the_same_first_batch(tmp_path, monkeypatch, tiny_model_dir, data_dir):
    for name in ("trl", "datasets"):
        pytest.importorskip(name)
    rows = _module("hf_rows", monkeypatch)
    cfg = _config(tmp_path, tiny_model_dir, data_dir, steps=2)
    hf = rows.run_row("hf", cfg, tmp_path / "work")
    trl = _subprocess_row("trl", cfg, tmp_path / "work")
    assert trl["versions"]["trl"] and len(trl["losses"]) == 2
    assert trl["losses"][0][1] == pytest.approx(hf["losses"][0][1], rel=1e-4)


def test_liger_patches_the_peft_model_as_hf_trainer_applies_it(tiny_model_dir):
    """The liger row's integration (transformers' apply_liger_kernel on a PEFT model): Liger's modules and
    forward replace the model's. Its Triton kernels themselves do not run in Triton's CPU interpreter."""
    pytest.importorskip("liger_kernel")
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations.liger import apply_liger_kernel

    import lorafit
    from lorafit.model import lora_config

    cfg = lorafit.load_config(None, {"model": tiny_model_dir, "data": ["unused.json"]})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(cfg))
    apply_liger_kernel(model, {})
    base = model.get_base_model()
    assert repr(base.model.norm).startswith("LigerRMSNorm")  # patched per instance: the class stays
    assert base.model.layers[0].mlp.forward.__func__.__module__.startswith("liger_kernel.")
    assert base.forward.__func__.__module__.startswith("liger_kernel.")  # its fused linear cross-entropy


@pytest.mark.slow  # two processes, each importing torch and transformers
def test_bench_trainer_cpu(tmp_path, monkeypatch, tiny_model_dir, data_dir):
    """The whole benchmark, rows in their own processes; a row whose package is missing is skipped, not failed."""
    bench = _module("bench_trainer", monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res = bench.main(["--data", str(data_dir), "--out", str(tmp_path / "out"), "--steps", "2", "--model-dir", tiny_model_dir,
                      "--device", "cpu", "--work", str(tmp_path / "work"), "--rows", "hf,lorafit"])
    rows = res["rows"]
    assert all(r["exit"] == 0 for r in rows.values()), {k: r["stderr_tail"] for k, r in rows.items()}
    assert rows["lorafit"]["step"] == "eager"  # on CPU the defaults are lorafit-eager's step (fused_kernels: auto)
    assert rows["hf"]["losses"][0][1] == pytest.approx(rows["lorafit"]["losses"][0][1], rel=1e-4)
    assert set(res["speedup_vs_hf"]) == {"hf", "lorafit"} and res["epoch_tokens"] > 0
    assert (tmp_path / "out" / "trainer-llama3-8b.json").is_file()


def test_missing_package_row_is_skipped(tmp_path, monkeypatch):
    bench = _module("bench_trainer", monkeypatch)
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    row = bench.run_row("trl", {"model": "m"}, tmp_path, tmp_path)
    assert "trl is not importable" in row["skipped"]
