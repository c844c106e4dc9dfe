"""Two processes on CPU (gloo) through torchrun: the same code path as N GPUs with NCCL.

DDP and FSDP2 (fully_shard on a CPU device mesh) both run here; checkpoints move between them.

Each torchrun launch costs a process-group start-up (two workers importing torch, transformers and lorafit:
~10 s on two cores). So the 2-process runs of the tests that compare with one process -- DDP, FSDP, DDP with
fused kernels, and FSDP continuing a 1-process run -- are trained in one launch, in the same processes, by
dist_probe.py (`two_process_runs`), and every 1-process run is `lorafit train` called in this process.
`lorafit train --nproc 2` itself is what the kill test launches (and test_dist_matrix's error test).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit.demoset import write_demo_data

PROBE = Path(__file__).with_name("dist_probe.py")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread in this process, as the OMP_NUM_THREADS=1 workers have: tiny models gain nothing
    from two, and lose much when the cores are shared with the workers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path, tiny_model_dir, name, **kw):
    train, val = write_demo_data(tmp_path / "data")
    cfg = {"model": tiny_model_dir, "data": [str(train)], "val_data": {"support": str(val)},
           "output_dir": str(tmp_path / name), "max_steps": 4, "max_length": 64, "batch_size": 2,
           "gradient_accumulation_steps": 2, "eval_steps": 2, "logging_steps": 1, "save_steps": 2,
           "learning_rate": 1e-3, "lora_dropout": 0.1, "device": "cpu", **kw}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run(args):
    """`lorafit train ARGS` in one process (this one)."""
    from lorafit.cli import main

    assert main(["train", *args, "--no-progress"]) == 0


def _env():
    # Without the Triton interpreter (conftest keeps it for tests/unit/kernels/ only; module-scoped fixtures
    # run before its per-test fixture takes it away).
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}


FSDP_KW = dict(eval_batch_size=5, early_stopping_patience=3, l2_penalty=0.01)  # test_fsdp_two_processes_match_one
MOVE_KW = dict(max_steps=8, save_total_limit=10)  # test_checkpoints_move_between_fsdp_and_one_process


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_model_dir):
    """One torchrun launch (2 processes) trains, in turn: `fsdp`; `mid` (FSDP, continuing the 1-process run
    `ref` from its step-2 checkpoint); `two` (DDP); `fused-two` (DDP, fused kernels). Returns (folder, launch)."""
    tmp = tmp_path_factory.mktemp("two-process")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        _run([str(_cfg(tmp, tiny_model_dir, "ref", **MOVE_KW))])
    _continue_from(tmp / "ref", 2, tmp / "mid")
    # FSDP first: it sets up the process group and its device mesh as `lorafit train --nproc 2` would (the
    # DDP runs after it reuse them; DDP from a fresh start is the kill test's and test_dist_matrix's).
    runs = [_cfg(tmp, tiny_model_dir, "fsdp", distributed="fsdp", gradient_accumulation_steps=1, **FSDP_KW),
            _cfg(tmp, tiny_model_dir, "mid", distributed="fsdp", gradient_accumulation_steps=1, **MOVE_KW),
            _cfg(tmp, tiny_model_dir, "two", gradient_accumulation_steps=1),  # per device: 2 x 1 x 2 = 4
            _cfg(tmp, tiny_model_dir, "fused-two", fused_kernels=True, gradient_accumulation_steps=1)]
    spec = tmp / "spec.json"
    spec.write_text(json.dumps([{"config": str(c)} for c in runs]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(PROBE), str(spec)], capture_output=True, text=True, env=_env(), timeout=300)
    return tmp, r


def _launched(two_process_runs, run):
    tmp, r = two_process_runs
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp / run / "adapter").is_dir(), r.stderr[-3000:]
    return tmp / run


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, tiny_model_dir, two_process_runs):
    _run([str(_cfg(tmp_path, tiny_model_dir, "one"))])
    two = _launched(two_process_runs, "two")
    wa = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:  # same global batch, data sharded without overlap: same update up to reduction order
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    la = [json.loads(l) for l in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (two / "log.jsonl").read_text().splitlines()]
    losses = lambda L: [(r["step"], round(r.get("loss", r.get("eval_loss")), 4)) for r in L if r["type"] in ("train", "eval")]
    assert losses(la) == losses(lb)  # only rank 0 writes: no duplicated records
    assert lb[0]["world_size"] == 2
    assert lb[0]["distributed"] == "ddp"  # auto on CPU


@pytest.mark.slow
def test_killed_two_process_run_resumes_on_one(tmp_path, tiny_model_dir):
    import signal
    import time

    import psutil

    ref = _cfg(tmp_path, tiny_model_dir, "ref", max_steps=16)
    cut = _cfg(tmp_path, tiny_model_dir, "cut", max_steps=16, gradient_accumulation_steps=1)
    p = subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(cut), "--no-progress", "--nproc=2"],
                         env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    manifest = tmp_path / "cut" / "checkpoints" / "step-2" / "manifest.json"
    deadline = time.time() + 240
    while not manifest.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # A lost machine takes every process with it. torchrun's workers run in sessions of their own, so
    # killing the launcher's group would leave them finishing the run: kill the whole tree at once.
    tree = [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()
    assert not (tmp_path / "cut" / "adapter").exists(), "run finished before it could be killed"
    _run([str(cut), "--gradient_accumulation_steps=2"])  # one process, the same global batch: resumes
    _run([str(ref)])
    recs = [json.loads(l) for l in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" for r in recs)
    wa = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def _losses(run):
    recs = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    return recs, [(r["type"], r["step"], r.get("loss", r.get("eval_loss"))) for r in recs if r["type"] in ("train", "eval")]


def _same_adapter(a, b, atol=1e-5):
    wa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol), k


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path, tiny_model_dir, two_process_runs):
    # eval_batch_size 5 on 12 validation examples: rank 0 gets 2 batches, rank 1 one (plus a dummy,
    # since FSDP's forward is collective); early stopping on: the best adapter is gathered and saved;
    # l2_penalty: its gradient is added once to the reduced (sharded) grads.
    _run([str(_cfg(tmp_path, tiny_model_dir, "one", **FSDP_KW))])
    fsdp = _launched(two_process_runs, "fsdp")
    _same_adapter(tmp_path / "one", fsdp)
    (_, la), (rb, lb) = _losses(tmp_path / "one"), _losses(fsdp)
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    for x, y in zip(la, lb):
        assert abs(x[2] - y[2]) <= 1e-5 * abs(x[2]), (x, y)
    assert rb[0]["world_size"] == 2 and rb[0]["distributed"] == "fsdp"
    from peft import PeftModel  # the adapter is the ordinary PEFT format

    from lorafit.model import load_model
    PeftModel.from_pretrained(load_model(tiny_model_dir, device="cpu"), str(fsdp / "adapter"))


def _continue_from(src, step, dst):
    """A run folder holding `src`'s log and its checkpoint `step` only: a run interrupted there."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step-{step}", dst / "checkpoints" / f"step-{step}")
    for name in ("log.jsonl", "config.yaml", ".lorafit-run"):  # what an interrupted run's folder holds
        shutil.copy(src / name, dst / name)


@pytest.mark.slow
def test_checkpoints_move_between_fsdp_and_one_process(tiny_model_dir, two_process_runs):
    """1 process -> FSDP on 2 -> 1 process again ends where an uninterrupted run ends."""
    mid = _launched(two_process_runs, "mid")  # `ref`'s step-2 checkpoint, continued by 2 FSDP processes
    tmp = mid.parent  # where `ref` (1 process, uninterrupted) and the data of all three are
    ref, end = tmp / "ref", tmp / "end"
    _same_adapter(ref, mid)
    _continue_from(mid, 6, end)  # step-6 written by the FSDP ranks
    _run([str(_cfg(tmp, tiny_model_dir, "end", **MOVE_KW))])
    _same_adapter(ref, end)
    for run in (mid, end):
        recs, losses = _losses(run)
        assert any(r.get("event") == "resume" for r in recs)
        ref_losses = _losses(ref)[1]
        assert [x[:2] for x in losses] == [x[:2] for x in ref_losses]
        for x, y in zip(losses, ref_losses):
            assert abs(x[2] - y[2]) <= 1e-5 * abs(y[2]), (run, x, y)


def test_auto_strategy_rule(monkeypatch):
    from types import SimpleNamespace

    from lorafit.training import dist

    assert dist.choose("auto", 10 ** 12, torch.device("cpu")) == "ddp"  # CPU: always DDP
    assert dist.choose("fsdp", 1, torch.device("cpu")) == "fsdp"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * 2 ** 30))
    gpu = torch.device("cuda", 0)
    assert dist.choose("auto", 16 * 2 ** 30, gpu) == "ddp"  # an 8B model in bf16 fits an 80 GiB card
    assert dist.choose("auto", 60 * 2 ** 30, gpu) == "fsdp"
    assert dist.choose("ddp", 60 * 2 ** 30, gpu) == "ddp"


def test_distributed_config_values(tmp_path):
    from lorafit.config import load_config
    from lorafit.errors import ConfigError

    p = tmp_path / "c.yaml"
    for ok in ("auto", "ddp", "fsdp"):
        p.write_text(f"model: org/m\ndata: a.json\ndistributed: {ok}\n")
        assert load_config(p).distributed == ok
    p.write_text("model: org/m\ndata: a.json\ndistributed: zero3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.field == "distributed" and e.value.line == 3
    p.write_text("model: org/m\ndata: a.json\ndistributed: fsdp\nfused_kernels: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.field == "fused_kernels"


@pytest.mark.slow
def test_bench_dist_cpu_smoke(tmp_path):
    """benchmarks/bench_dist.py's driver, 2 processes FSDP on CPU: runs, and each rank holds half the weights."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_dist.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), "--sweep", "2", "--strategy", "fsdp", "--device", "cpu",
                        "--model", "tiny-llama", "--steps", "1", "--warmup", "0", "--length", "16",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((tmp_path / "dist-tiny-llama-n2.json").read_text())["runs"]["fsdp"]
    assert run["world_size"] == 2 and run["tokens_per_s"] > 0
    full = run["params"] * 4 / 2 ** 30  # float32 on CPU
    assert all(abs(g - full / 2) < 0.01 * full for g in run["param_gib_per_rank"])
    assert (tmp_path / "dist-tiny-llama-summary.json").is_file()


@pytest.mark.slow
def test_ddp_with_fused_kernels_matches_one_process(tmp_path, tiny_model_dir, two_process_runs):
    # The fused loss runs the decoder itself; it must still go through DDP's forward, or the
    # gradients of the two processes are never averaged.
    _run([str(_cfg(tmp_path, tiny_model_dir, "one", fused_kernels=True))])
    two = _launched(two_process_runs, "fused-two")
    wa = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
