"""Two processes on CPU (gloo) through torchrun: the same code path as N GPUs with NCCL."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit.demoset import write_demo_data


def _cfg(tmp_path, tiny_model_dir, name, **kw):
    train, val = write_demo_data(tmp_path / "data")
    cfg = {"model": tiny_model_dir, "data": [str(train)], "val_data": {"support": str(val)},
           "output_dir": str(tmp_path / name), "max_steps": 4, "max_length": 64, "batch_size": 2,
           "gradient_accumulation_steps": 2, "eval_steps": 2, "logging_steps": 1, "save_steps": 2,
           "learning_rate": 1e-3, "lora_dropout": 0.0, "device": "cpu", **kw}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run(args, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorafit", "train", *args, "--no-progress"] + ([f"--nproc={nproc}"] if nproc else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, tiny_model_dir):
    one = _cfg(tmp_path, tiny_model_dir, "one")
    two = _cfg(tmp_path, tiny_model_dir, "two")
    _run([str(one)])
    _run([str(two)], nproc=2)
    wa = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:  # same global batch, data sharded without overlap: same update up to reduction order
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    la = [json.loads(l) for l in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    losses = lambda L: [(r["step"], round(r.get("loss", r.get("eval_loss")), 4)) for r in L if r["type"] in ("train", "eval")]
    assert losses(la) == losses(lb)  # only rank 0 writes: no duplicated records
    assert lb[0]["world_size"] == 2


@pytest.mark.slow
def test_killed_two_process_run_resumes_on_one(tmp_path, tiny_model_dir):
    import signal
    import time

    ref = _cfg(tmp_path, tiny_model_dir, "ref", max_steps=16)
    cut = _cfg(tmp_path, tiny_model_dir, "cut", max_steps=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(cut), "--no-progress", "--nproc=2"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    manifest = tmp_path / "cut" / "checkpoints" / "step-2" / "manifest.json"
    deadline = time.time() + 240
    while not manifest.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "cut" / "adapter").exists(), "run finished before it could be killed"
    _run([str(cut)])  # same command, one process: resumes from the last checkpoint
    _run([str(ref)])
    recs = [json.loads(l) for l in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" for r in recs)
    wa = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
