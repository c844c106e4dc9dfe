"""Two processes on CPU (gloo) through torchrun: the same code path as N GPUs with NCCL.

DDP and FSDP2 (fully_shard on a CPU device mesh) both run here; checkpoints move between them.
"""
import json
import os
import shutil
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
           "learning_rate": 1e-3, "lora_dropout": 0.1, "device": "cpu", **kw}
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
    two = _cfg(tmp_path, tiny_model_dir, "two", gradient_accumulation_steps=1)  # per device: 2 x 1 x 2 = 4
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
    assert lb[0]["distributed"] == "ddp"  # auto on CPU


@pytest.mark.slow
def test_killed_two_process_run_resumes_on_one(tmp_path, tiny_model_dir):
    import signal
    import time

    import psutil

    ref = _cfg(tmp_path, tiny_model_dir, "ref", max_steps=16)
    cut = _cfg(tmp_path, tiny_model_dir, "cut", max_steps=16, gradient_accumulation_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(cut), "--no-progress", "--nproc=2"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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
def test_fsdp_two_processes_match_one(tmp_path, tiny_model_dir):
    # eval_batch_size 5 on 12 validation examples: rank 0 gets 2 batches, rank 1 one (plus a dummy,
    # since FSDP's forward is collective); early stopping on: the best adapter is gathered and saved;
    # l2_penalty: its gradient is added once to the reduced (sharded) grads.
    kw = dict(eval_batch_size=5, early_stopping_patience=3, l2_penalty=0.01)
    one = _cfg(tmp_path, tiny_model_dir, "one", **kw)
    two = _cfg(tmp_path, tiny_model_dir, "fsdp", distributed="fsdp", gradient_accumulation_steps=1, **kw)
    _run([str(one)])
    _run([str(two)], nproc=2)
    _same_adapter(tmp_path / "one", tmp_path / "fsdp")
    (_, la), (rb, lb) = _losses(tmp_path / "one"), _losses(tmp_path / "fsdp")
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    for x, y in zip(la, lb):
        assert abs(x[2] - y[2]) <= 1e-5 * abs(x[2]), (x, y)
    assert rb[0]["world_size"] == 2 and rb[0]["distributed"] == "fsdp"
    from peft import PeftModel  # the adapter is the ordinary PEFT format

    from lorafit.model import load_model
    PeftModel.from_pretrained(load_model(tiny_model_dir, device="cpu"), str(tmp_path / "fsdp" / "adapter"))


def _continue_from(src, step, dst):
    """A run folder holding `src`'s log and its checkpoint `step` only: a run interrupted there."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step-{step}", dst / "checkpoints" / f"step-{step}")
    for name in ("log.jsonl", "config.yaml", ".lorafit-run"):  # what an interrupted run's folder holds
        shutil.copy(src / name, dst / name)


@pytest.mark.slow
def test_checkpoints_move_between_fsdp_and_one_process(tmp_path, tiny_model_dir):
    """1 process -> FSDP on 2 -> 1 process again ends where an uninterrupted run ends."""
    kw = dict(max_steps=8, save_total_limit=10)
    ref = _cfg(tmp_path, tiny_model_dir, "ref", **kw)
    _run([str(ref)])
    _continue_from(tmp_path / "ref", 2, tmp_path / "mid")
    _run([str(_cfg(tmp_path, tiny_model_dir, "mid", distributed="fsdp", gradient_accumulation_steps=1, **kw))], nproc=2)
    _same_adapter(tmp_path / "ref", tmp_path / "mid")
    _continue_from(tmp_path / "mid", 6, tmp_path / "end")  # step-6 written by the FSDP ranks
    _run([str(_cfg(tmp_path, tiny_model_dir, "end", **kw))])
    _same_adapter(tmp_path / "ref", tmp_path / "end")
    for run in ("mid", "end"):
        recs, losses = _losses(tmp_path / run)
        assert any(r.get("event") == "resume" for r in recs)
        ref_losses = _losses(tmp_path / "ref")[1]
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
                        "--model", "smollm2-135m", "--steps", "1", "--warmup", "0", "--length", "16",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((tmp_path / "dist-smollm2-135m-n2.json").read_text())["runs"]["fsdp"]
    assert run["world_size"] == 2 and run["tokens_per_s"] > 0
    full = run["params"] * 4 / 2 ** 30  # float32 on CPU
    assert all(abs(g - full / 2) < 0.01 * full for g in run["param_gib_per_rank"])
    assert (tmp_path / "dist-smollm2-135m-summary.json").is_file()


@pytest.mark.slow
def test_ddp_with_fused_kernels_matches_one_process(tmp_path, tiny_model_dir):
    # The fused loss runs the decoder itself; it must still go through DDP's forward, or the
    # gradients of the two processes are never averaged.
    one = _cfg(tmp_path, tiny_model_dir, "one", fused_kernels=True)
    two = _cfg(tmp_path, tiny_model_dir, "two", fused_kernels=True, gradient_accumulation_steps=1)
    _run([str(one)])
    _run([str(two)], nproc=2)
    wa = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def _average_worker(rank, world, init_file, out):
    import torch.distributed as tdist

    from lorafit.training import dist as D

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(1))]
    for k, p in enumerate(params[:2]):  # the third has no gradient: skipped, not an error
        p.grad = torch.full_like(p, float(rank + 1) * (k + 1))
    D.average_gradients(params)
    torch.save([None if p.grad is None else p.grad for p in params], f"{out}-{rank}.pt")
    tdist.destroy_process_group()


def test_average_gradients_is_the_mean_over_ranks(tmp_path):
    # What a replayed CUDA-graph step calls in place of DDP's reduction: one flat all-reduce.
    import torch.multiprocessing as mp

    mp.spawn(_average_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "g")), nprocs=2, join=True)
    for rank in range(2):
        g = torch.load(tmp_path / f"g-{rank}.pt")
        assert torch.equal(g[0], torch.full((3, 2), 1.5)) and torch.equal(g[1], torch.full((5,), 3.0))
        assert g[2] is None
