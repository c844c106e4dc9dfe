"""`kill -9` of the real `lorafit train` at random moments (one aimed into a checkpoint write), then
the same command again: the run resumes from the last complete checkpoint and ends with exactly the
adapter and log of an uninterrupted run.

Tiny random Llama (SmolLM2's tokenizer), CPU, real subprocesses: `python -m lorafit train cfg.yaml`.
Comparison: adapter tensors bit-identical (CPU training is deterministic, so no tolerance); log
records equal except the timing field `tokens_per_s` and the `resume` events the kills add; the same
checkpoints kept, with identical weights; no temporary folder left behind.

The kill moments come from a seeded RNG (`SEED`), expressed as progress (log lines written, a
checkpoint folder appearing) rather than wall time, so they land inside training on a slow or busy
machine too. The checkpoint-write kill polls for the writer's own `.tmp-step-N-<pid>` folder and kills
as soon as it appears; the write lasts a few milliseconds, so a miss is possible -- the test then
aims again at the next checkpoint (up to 3 tries) and asserts that one kill did land mid-write.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SEED = 20240611
ROOT = Path(__file__).resolve().parents[2]
TIMING = ("tokens_per_s",)


def _write_inputs(tmp: Path, model: str, out: Path) -> Path:
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{i} + {i + 1} = {2 * i + 1}."}
            for i in range(12)]
    (tmp / "train.json").write_text(json.dumps(rows[:10]), encoding="utf-8")
    (tmp / "val.json").write_text(json.dumps(rows[10:]), encoding="utf-8")
    cfg = dict(model=model, data=["train.json"], val_data={"dev": "val.json"}, output_dir=str(out), device="cpu",
               lora_rank=4, lora_alpha=8, lora_dropout=0.1, batch_size=2, max_steps=16, warmup_steps=2,
               save_steps=3, save_total_limit=2, logging_steps=2, eval_steps=4, max_length=64, seed=7)
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _start(cfg: Path, tag: str) -> subprocess.Popen:
    logs = cfg.parent / "logs"
    logs.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(cfg), "--no-progress"], cwd=ROOT,
                            stdout=open(logs / f"{tag}.out", "w"), stderr=open(logs / f"{tag}.err", "w"),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_until(proc: subprocess.Popen, cond, timeout: float = 120, poll: float = 0.0005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out waiting for the training process")


def _log_lines(out: Path) -> int:
    try:
        return (out / "log.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _tmp_dirs(out: Path, pid: int | None = None) -> list[str]:
    try:
        names = os.listdir(out / "checkpoints")
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(".tmp-step-") and (pid is None or n.endswith(f"-{pid}"))]


def _kill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run finished before the planned kill; lower the kill thresholds"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _assert_ok(proc: subprocess.Popen, err_file: Path) -> None:
    assert proc.wait(timeout=300) == 0, err_file.read_text()


def _records(out: Path) -> list[dict]:
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs if r.get("event") != "resume"]


def _adapter_config(out: Path) -> dict:
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set: order varies per process
    return cfg


def _checkpoint_weights(out: Path) -> dict[str, str]:
    return {d.name: json.loads((d / "manifest.json").read_text())["files"]["trainable.safetensors"]["sha256"]
            for d in sorted((out / "checkpoints").glob("step-*"))}


def test_kill_9_and_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    t0 = time.monotonic()
    rng = random.Random(SEED)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    ref_cfg = _write_inputs(tmp_path, tiny_model_dir, ref_out)
    cfg = _write_inputs(tmp_path, tiny_model_dir, out)
    reference = _start(ref_cfg, "reference")  # runs alongside the kill sequence

    kills: list[str] = []
    mid_write = 0

    # Kill 1: a random moment early in training (after 2-5 log lines, plus up to 0.3 s).
    proc = _start(cfg, "run1")
    n = rng.randint(2, 5)
    _wait_until(proc, lambda: _log_lines(out) >= n)
    time.sleep(rng.uniform(0, 0.3))
    _kill(proc)
    kills.append(f"after {n} log lines")

    # Kill 2 (up to 3 tries): aimed into a checkpoint write, when this process's temporary folder appears.
    for attempt in range(3):
        proc = _start(cfg, f"run{2 + attempt}")
        assert _wait_until(proc, lambda: bool(_tmp_dirs(out, proc.pid))), "no checkpoint write seen"
        _kill(proc)
        hit = bool(_tmp_dirs(out, proc.pid))  # still there: the rename never happened
        kills.append(f"checkpoint write (attempt {attempt + 1}, {'mid-write' if hit else 'just after'})")
        if hit:
            mid_write += 1
            break

    # Kill 3: a random moment later on: once checkpoint step-6 or later exists, then up to 1 s.
    proc = _start(cfg, "run-late")
    _wait_until(proc, lambda: any(int(d.name[5:]) >= 6 for d in (out / "checkpoints").glob("step-*")), poll=0.01)
    time.sleep(rng.uniform(0, 1.0))
    _kill(proc)
    kills.append("late")

    # The same command again, to completion.
    final = _start(cfg, "final")
    _assert_ok(final, tmp_path / "logs" / "final.err")
    _assert_ok(reference, tmp_path / "logs" / "reference.err")
    elapsed = time.monotonic() - t0

    assert mid_write == 1, f"no kill landed inside a checkpoint write: {kills}"
    resumes = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if '"resume"' in ln]
    assert resumes, "the final run should have resumed from a checkpoint"
    assert "resumed from" in (tmp_path / "logs" / "final.err").read_text()

    # The same log, the same adapter (bit for bit), the same checkpoints, nothing half-written.
    assert _records(out) == _records(ref_out)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref_out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _adapter_config(out) == _adapter_config(ref_out)
    assert _checkpoint_weights(out) == _checkpoint_weights(ref_out)
    from lorafit.rundir import MARKER

    assert not _tmp_dirs(out) and not [p for p in out.iterdir() if p.name.startswith(".") and p.name != MARKER]
    print(f"kills: {kills}; resumes from {[r['checkpoint'] for r in resumes]}; {elapsed:.0f} s")
