"""Data-parallel scaling of LoRA training: global tokens/s and per-GPU memory, DDP vs FSDP2, on N GPUs.

    # driver: one torchrun per N (N above the visible GPU count is skipped), one summary JSON
    python benchmarks/bench_dist.py --sweep 1,2,4 --strategy ddp,fsdp --model llama3-8b --out DIR
    # one N by hand (what the driver launches)
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_dist.py --strategy ddp,fsdp --model llama3-8b --out DIR
    # CPU smoke (gloo): the same code path in a minute
    python benchmarks/bench_dist.py --sweep 1,2 --device cpu --model smollm2-135m --steps 2 --warmup 1 --length 64 --out DIR

Each rank builds the random-weight model of the named real shape (`speed_common.SHAPES`) directly on
its GPU with `speed_common.build` (bf16, LoRA r 16, alpha 32, dropout 0.1 on all seven projections),
wraps it with `lorafit.training.dist.wrap` as the trainer does, and trains `--warmup` + `--steps`
steps of a per-rank batch of 2 x 1024 random tokens: the plain HF + PEFT forward (`model(...).loss`,
no lorafit kernels), backward, clipping at 1.0, fused AdamW. Step time is wall time between
`cuda.synchronize()` calls; global tokens/s = N x batch x length / the slowest rank's median step.
Memory is `torch.cuda.max_memory_allocated` from after wrapping to the end, per rank, and the bytes
of parameters each rank holds (all of them under DDP, 1/N of them under FSDP).

Strategy `graph` is lorafit's fast path on N GPUs without DDP: the fused kernels (`accelerate_model`),
loss and backward replayed as one CUDA graph (`CudaGraphStep(eager_tail=True)`), then one flat
all-reduce of the LoRA gradients (`dist.average_gradients`), clipping and fused AdamW, eagerly. Its
N = 1 run is the same code without the all-reduce, and is the baseline of its own ratios. On CPU it
runs the same step eagerly (no graph), to test the code path.

One process per N runs every strategy in turn (the model is rebuilt for each): one start-up per N
keeps a 1,2,4 sweep of Llama-3-8B within a few minutes. N = 1 is the plain single-process run,
the baseline of the speed-up ratios (targets: >= 1.9x on 2 GPUs, >= 3.7x on 4).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lorafit.training import dist  # noqa: E402

GIB = 1024 ** 3
TARGETS_X = {2: 1.9, 4: 3.7}


def build_model(name: str, device: torch.device) -> Any:
    """speed_common's model on this rank's GPU; on CPU the same recipe in float32 (smoke tests only:
    speed_common.build allocates on CUDA)."""
    from speed_common import SHAPES, TARGETS, build

    if device.type == "cuda":
        return build(name)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[name])
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if shape.pop("family") == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**shape, attn_implementation="sdpa", use_cache=False))
    model.requires_grad_(False)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=TARGETS,
                                            bias="none", task_type="CAUSAL_LM"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds: its shard of a DTensor, else the whole tensor."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())


def gather(obj: Any) -> list[Any]:
    if dist.world()[2] == 1:
        return [obj]
    out: list[Any] = [None] * dist.world()[2]
    torch.distributed.all_gather_object(out, obj)
    return out


def graph_steps(args: argparse.Namespace, model: Any, batches: list[torch.Tensor], device: torch.device
                ) -> tuple[list[float], list[float], Any]:
    """Strategy `graph`: fused kernels, captured loss + backward, one flat gradient all-reduce."""
    from lorafit.kernels import CudaGraphStep, accelerate_model, causal_lm_loss

    model = accelerate_model(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [{"input_ids": ids, "labels": ids} for ids in batches]
    if device.type == "cuda":
        opt = torch.optim.AdamW(params, lr=torch.tensor(1e-4, device=device), fused=True, capturable=True)
        step = CudaGraphStep(model, opt, rows[0], max_grad_norm=1.0, warmup_steps=max(args.warmup, 2),
                             grad_hook=dist.average_gradients, eager_tail=True)
        warmup = 0
    else:  # the same step, eagerly: the code path on CPU, no timing meaning
        opt = torch.optim.AdamW(params, lr=1e-4)
        warmup = args.warmup

        def step(batch: dict) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = causal_lm_loss(model, batch)
            loss.backward()
            dist.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return loss.detach()
    times, losses = [], []
    for i in range(warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = step(rows[i % len(rows)])
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 5))
    gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])))
    return times, losses, gnorm


def run_strategy(args: argparse.Namespace, strategy: str, device: torch.device) -> dict[str, Any]:
    """Build, wrap, train warmup + steps steps; one record for all ranks (every rank returns it)."""
    from speed_common import free

    rank, _, ws = dist.world()
    t0 = time.perf_counter()
    model = build_model(args.model, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    graph = strategy == "graph"
    wrapped = model if graph else dist.wrap(model, strategy, device)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = None if graph else torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    sync(device)
    build_s = time.perf_counter() - t0
    vocab = model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(1000 + rank)  # every rank its own data, as in training
    batches = [torch.randint(0, vocab, (args.batch, args.length), generator=g).to(device) for _ in range(4)]
    wrapped.train()
    if device.type == "cuda":
        free()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    if graph:
        times, losses, gnorm = graph_steps(args, model, batches, device)
    for i in range(0 if graph else args.warmup + args.steps):
        ids = batches[i % len(batches)]
        sync(device)
        start = time.perf_counter()
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        gnorm = dist.as_float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 5))
    mine = {"step_s_median": statistics.median(times),
            "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
            "param_gib": local_param_bytes(wrapped) / GIB, "build_s": build_s}
    ranks = gather(mine)
    slowest = max(r["step_s_median"] for r in ranks)
    rec = {"strategy": strategy, "world_size": ws, "step_s_median": slowest,
           "tokens_per_s": ws * args.batch * args.length / slowest,
           "tokens_per_s_per_gpu": args.batch * args.length / slowest,
           "peak_gib_per_rank": [r["peak_gib"] for r in ranks], "param_gib_per_rank": [r["param_gib"] for r in ranks],
           "build_s": max(r["build_s"] for r in ranks), "step_s_all_rank0": [round(t, 5) for t in times],
           "losses_rank0": losses, "last_grad_norm": gnorm, "params": n_params, "trainable_params": n_train}
    if rank == 0:
        peak = rec["peak_gib_per_rank"][0]
        print(f"  N={ws} {strategy:<6} {rec['tokens_per_s']:>10,.0f} tok/s  {1000 * slowest:8.1f} ms/step  "
              + ("" if peak is None else f"peak {max(rec['peak_gib_per_rank']):6.2f} GiB  ")
              + f"params {rec['param_gib_per_rank'][0]:.2f} GiB/rank", flush=True)
    del wrapped, model, opt, params, batches
    free()
    return rec


def worker(args: argparse.Namespace) -> None:
    from speed_common import guarded

    rank, local, ws = dist.world()
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init(device)
    asked = args.strategy.split(",")
    if ws == 1:  # the baselines: the plain single-GPU run for ddp/fsdp, the single-GPU graph run for graph
        strategies = (["single"] if {"ddp", "fsdp"} & set(asked) else []) + (["graph"] if "graph" in asked else [])
    else:
        strategies = asked
    runs: dict[str, Any] = {}
    for s in strategies:
        guarded(runs, s, lambda s=s: run_strategy(args, s, device))
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rec = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
               "world_size": ws, "backend": "nccl" if device.type == "cuda" else "gloo", "model": args.model,
               "torch": torch.__version__, "settings": {k: getattr(args, k) for k in ("batch", "length", "steps", "warmup")},
               "lora": "r16 alpha32 dropout0.1 q,k,v,o,gate,up,down; AdamW fused; clip 1.0; HF+PEFT forward "
                       "(ddp, fsdp, single); lorafit fused kernels + CUDA graph + flat all-reduce (graph)",
               "runs": runs}
        (out / f"dist-{args.model}-n{ws}.json").write_text(json.dumps(rec, indent=1))
    dist.barrier()
    dist.cleanup()


def summarize(per_n: dict[int, dict[str, Any]], strategies: list[str]) -> dict[str, Any]:
    """Speed-up vs the 1-process run and FSDP's per-GPU memory against DDP's, per N."""
    n1 = per_n.get(1, {}).get("runs", {})
    table = {}
    for n, rec in sorted(per_n.items()):
        if n == 1:
            continue
        for s in strategies:
            base = n1.get("graph" if s == "graph" else "single", {}).get("tokens_per_s")
            r = rec["runs"].get(s, {})
            if "tokens_per_s" not in r:
                table[f"{s}-n{n}"] = {"error": r.get("error", "not run")}
                continue
            ratio = None if base is None else r["tokens_per_s"] / base
            peaks = [p for p in r["peak_gib_per_rank"] if p is not None]
            table[f"{s}-n{n}"] = {"tokens_per_s": r["tokens_per_s"], "speedup_vs_1": ratio,
                                  "target": TARGETS_X.get(n), "meets_target": None if ratio is None or n not in TARGETS_X
                                  else ratio >= TARGETS_X[n], "peak_gib_max": max(peaks) if peaks else None,
                                  "param_gib_per_rank": r["param_gib_per_rank"][0]}
        d, f = table.get(f"ddp-n{n}", {}), table.get(f"fsdp-n{n}", {})
        if d.get("param_gib_per_rank") and f.get("param_gib_per_rank"):
            f["params_vs_ddp"] = f["param_gib_per_rank"] / d["param_gib_per_rank"]
        if d.get("peak_gib_max") and f.get("peak_gib_max"):
            f["peak_vs_ddp"] = f["peak_gib_max"] / d["peak_gib_max"]
    return {"baseline_n1": {name: {k: r.get(k) for k in ("tokens_per_s", "peak_gib_per_rank", "param_gib_per_rank", "error")}
                            for name, r in n1.items()},
            "scaling": table}


def sweep(args: argparse.Namespace) -> None:
    ns = [int(x) for x in args.sweep.split(",")]
    have = torch.cuda.device_count() if args.device == "cuda" else max(ns)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_n, skipped, t0 = {}, [], time.perf_counter()
    passthrough = ["--model", args.model, "--strategy", args.strategy, "--device", args.device, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--length", str(args.length), "--out", str(out)]
    for n in ns:
        if n > have:
            skipped.append(n)
            print(f"N={n}: skipped ({have} GPUs visible)", flush=True)
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__, *passthrough]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t = time.perf_counter()
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        f = out / f"dist-{args.model}-n{n}.json"
        per_n[n] = json.loads(f.read_text()) if rc == 0 and f.is_file() else {"runs": {}, "error": f"torchrun exit {rc}"}
        print(f"N={n}: {time.perf_counter() - t:.0f} s (exit {rc})", flush=True)
    summary = {"model": args.model, "device": next((r.get("device") for r in per_n.values() if "device" in r), None),
               "torch": torch.__version__, "sweep": ns, "skipped": skipped, "strategies": args.strategy.split(","),
               **summarize(per_n, args.strategy.split(",")), "total_s": time.perf_counter() - t0,
               "command": " ".join(["python", "benchmarks/bench_dist.py", "--sweep", args.sweep, *passthrough])}
    (out / f"dist-{args.model}-summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["scaling"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=None, help="driver mode: comma-separated process counts, e.g. 1,2,4")
    ap.add_argument("--strategy", default="ddp,fsdp", help="comma-separated: ddp, fsdp, graph")
    ap.add_argument("--model", default="llama3-8b", help="a speed_common.SHAPES name")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="rows per GPU")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per torchrun launch (driver)")
    ap.add_argument("--out", default="benchmarks/results/dist")
    args = ap.parse_args()
    if any(s not in ("ddp", "fsdp", "graph") for s in args.strategy.split(",")):
        ap.error("--strategy: ddp, fsdp and/or graph")
    sweep(args) if args.sweep else worker(args)


if __name__ == "__main__":
    main()
