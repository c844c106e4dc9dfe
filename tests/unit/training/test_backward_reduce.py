"""The bucketed / CUDA-graph step's gradient reduction over several processes (DDP does not wrap it): inside
backward (`dist.BackwardReduce`) with one micro-batch per process a step, else after it (`dist.sum_gradients`).
Every rank ends with the sum of its pre-scaled gradients (the mean), whatever order its hooks fire in, and a
rank without a micro-batch joins with zeros. Every multi-process run here is under a timeout."""
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit.demoset import write_demo_data


def _spawn(fn, args, nprocs=2, timeout=120):
    """torch.multiprocessing.spawn under a deadline: a hung collective fails the test instead of CI."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__}: the {nprocs} processes did not finish within {timeout} s")


def _sum_worker(rank, world, init_file, out):
    import torch.distributed as tdist

    from lorafit.training import dist as D

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(1))]
    for k, p in enumerate(params[:2]):  # the third has no gradient: skipped, not an error
        p.grad = torch.full_like(p, float(rank + 1) * (k + 1))
    D.sum_gradients(params)
    flat = torch.full((4,), float(rank + 1))  # the bucketed step's case: gradients are views of one buffer
    D.sum_gradients([], flat)
    torch.save([None if p.grad is None else p.grad for p in params] + [flat], f"{out}-{rank}.pt")
    tdist.destroy_process_group()


def test_sum_gradients_is_the_sum_over_ranks(tmp_path):
    _spawn(_sum_worker, (2, str(tmp_path / "init"), str(tmp_path / "g")))
    for rank in range(2):
        g = torch.load(tmp_path / f"g-{rank}.pt")
        assert torch.equal(g[0], torch.full((3, 2), 3.0)) and torch.equal(g[1], torch.full((5,), 6.0))
        assert g[2] is None and torch.equal(g[3], torch.full((4,), 3.0))


def _reduce_worker(rank, world, init_file, out):
    import torch.distributed as tdist

    from lorafit.training import dist as D

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    params = list(layers.parameters())
    flat = torch.zeros(sum(p.numel() for p in params))
    off = 0
    for p in params:
        p.grad = flat[off:off + p.numel()].view_as(p)
        off += p.numel()
    red = D.BackwardReduce(params, flat, min_elems=100)  # several chunks (6 layers of 72 values)
    assert len(red.chunks) > 2
    results = []
    for step in range(2):
        flat.zero_()
        if rank == 1 and step == 1:
            red.idle()  # no micro-batch on this rank this step
        else:
            red.begin()
            x = torch.full((4, 8), float(rank + 1 + step))
            (layers(x).sum() / world).backward()
            red.finish()
        results.append(flat.clone())
    torch.save(results, f"{out}-{rank}.pt")
    tdist.destroy_process_group()


def test_backward_reduce_gives_every_rank_the_mean(tmp_path):
    _spawn(_reduce_worker, (2, str(tmp_path / "init"), str(tmp_path / "g")))
    r0, r1 = (torch.load(tmp_path / f"g-{r}.pt") for r in range(2))
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])

    def grads(fill):
        layers.zero_grad()
        (layers(torch.full((4, 8), fill)).sum() / 2).backward()
        return torch.cat([p.grad.reshape(-1) for p in layers.parameters()])

    step0 = grads(1.0) + grads(2.0)  # ranks 0 and 1, each pre-scaled by 1/2
    step1 = grads(2.0)  # rank 1 idle: its zeros count
    for r in (r0, r1):
        assert torch.allclose(r[0], step0, atol=1e-6) and torch.allclose(r[1], step1, atol=1e-6)


def _cfg(tmp_path, tiny_model_dir, name, **kw):
    train, val = write_demo_data(tmp_path / "data")
    cfg = {"model": tiny_model_dir, "data": [str(train)], "val_data": {"support": str(val)},
           "output_dir": str(tmp_path / name), "max_steps": 3, "max_length": 64, "batch_size": 2,
           "gradient_accumulation_steps": 2, "eval_steps": 3, "logging_steps": 1, "save_steps": 3,
           "learning_rate": 1e-3, "lora_dropout": 0.1, "device": "cpu", "fused_kernels": True,
           "cuda_graph": True, **kw}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


PROBE = """
import sys
import torch
from lorafit.cli import main
from lorafit.training import dist, graphstep

real, calls = graphstep.BucketedStep._forward_backward, {"n": 0}

def nan_at_micro_batch_3(self, batch):  # the run's micro-batch k; rank r runs window[r::N], G of them a step
    rank, ws, g, c = dist.world()[0], dist.world()[2], int(sys.argv[2]), calls["n"]
    k = (c // g) * g * ws + ws * (c % g) + rank
    calls["n"] += 1
    if k != 3:
        return real(self, batch)
    self.loss_fn, keep = (lambda *a, **kw: keep(*a, **kw) * float("nan")), self.loss_fn
    try:
        return real(self, batch)
    finally:
        self.loss_fn = keep

graphstep.BucketedStep._forward_backward = nan_at_micro_batch_3
sys.exit(main(["train", sys.argv[1], "--no-progress"]))  # argv[2]: gradient_accumulation_steps
"""


@pytest.mark.slow
@pytest.mark.parametrize("ga_two,skipped", [(1, 2), (2, 1)], ids=["in-backward", "after-backward"])
def test_bucketed_step_on_two_processes_matches_one(tmp_path, tiny_model_dir, ga_two, skipped):
    """cuda_graph on CPU: the bucketed step without capture on 2 processes against 1 process at the same global
    batch. One micro-batch per process a step: the all-reduce runs inside backward; two: after it
    (`sum_gradients`). Micro-batch 3 (rank 1's) has a NaN loss: both processes skip its step, as one does."""
    import json

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, ga, nproc in (("one", 2 * ga_two, 1), ("two", ga_two, 2)):
        cfg = _cfg(tmp_path, tiny_model_dir, name, gradient_accumulation_steps=ga)
        cmd = [sys.executable, str(probe), str(cfg), str(ga)] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(probe),
             str(cfg), str(ga)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    recs = {n: [json.loads(ln) for ln in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("one", "two")}
    assert recs["two"][0]["step_kind"] == "bucketed" and recs["two"][0]["world_size"] == 2
    for n in ("one", "two"):
        assert [r["step"] for r in recs[n] if r.get("event") == "nonfinite_skip"] == [skipped], n
    losses = lambda L: [(r["step"], round(r["loss"], 5)) for r in L if r["type"] == "train"]  # noqa: E731
    assert losses(recs["one"]) == losses(recs["two"])
    wa = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
