"""Scaling of lorafit's trainer over N GPUs, per strategy: throughput, memory per GPU, parameters per rank.

    # driver: one torchrun per N of the sweep (the model folder and data are written once, first)
    python benchmarks/bench_dist.py --sweep 1,2,4 --strategy ddp,fsdp,graph --model llama3-8b --out DIR
    # CPU smoke (gloo): the same code path in a minute
    python benchmarks/bench_dist.py --sweep 1,2 --device cpu --model smollm2-135m --steps 2 --warmup 1 --length 64 --out DIR

Every run is lorafit's own trainer (`lorafit.training.loop.Trainer`, what `lorafit train --nproc N` runs in
each process), built from a config in each torchrun process, so the step, the wrapper and the all-reduce
are the product's. The model is a random-weight folder of the named real shape (`shapes.SHAPES`, bf16,
SmolLM2's tokenizer); the data synthetic examples longer than `--length`, so each rank's micro-batch is
`--batch` x `--length` tokens without padding. LoRA r 16, alpha 32, dropout 0.1 on all linear layers,
AdamW, clipping at 1.0, constant LR 1e-4, `--warmup` + `--steps` optimizer steps, logged every step.

Strategies (config keys):
  ddp     `distributed: ddp, fused_kernels: false`: HF + PEFT's forward under DDP
  fsdp    `distributed: fsdp, fused_kernels: false`: each rank holds 1/N of the weights
  graph   `distributed: ddp` with lorafit's defaults: fused kernels and the bucketed CUDA-graph step, no DDP
          wrapper, one flat all-reduce of the LoRA gradients (on CPU: the eager step, no timing meaning)
  single  (N = 1, the baseline of ddp and fsdp) `fused_kernels: false`
N = 1 runs `single` for ddp/fsdp and `graph` for graph: each strategy's ratio is against its own one-GPU
run (targets: >= 1.9x on 2 GPUs, >= 3.7x on 4). Tokens/s is the trainer's own log figure (global, real
tokens), the median of the steps after `--warmup`. Memory per rank is `torch.cuda.max_memory_allocated`
over the run; parameters per rank are the bytes each rank's wrapped model holds (its shard of a DTensor).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shapes import SHAPES, build_model_folder, write_long_examples

GIB = 1024 ** 3
TARGETS_X = {2: 1.9, 4: 3.7}
STRATEGIES = {"single": {"fused_kernels": False}, "ddp": {"distributed": "ddp", "fused_kernels": False},
              "fsdp": {"distributed": "fsdp", "fused_kernels": False}, "graph": {"distributed": "ddp"}}


def run_config(args: argparse.Namespace, strategy: str, world_size: int) -> dict[str, Any]:
    work = Path(args.work)
    return {"model": str(work / args.model), "data": [str(work / f"long-{args.length}.json")],
            "max_length": args.length, "batch_size": args.batch, "max_steps": args.warmup + args.steps,
            "learning_rate": 1e-4, "lr_scheduler": "constant", "warmup_steps": 0, "warmup_ratio": 0.0,
            "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": "all-linear",
            "max_grad_norm": 1.0, "logging_steps": 1, "eval_steps": 10 ** 6, "save_steps": 10 ** 6, "seed": 0,
            "device": args.device, "output_dir": str(work / "runs" / f"{strategy}-n{world_size}"),
            **STRATEGIES[strategy]}


def local_param_bytes(model: Any) -> int:
    """Bytes of parameters this rank holds: its shard of a DTensor, else the whole tensor."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())


def gather(obj: Any) -> list[Any]:
    import torch

    from lorafit.training import dist

    if dist.world()[2] == 1:
        return [obj]
    out: list[Any] = [None] * dist.world()[2]
    torch.distributed.all_gather_object(out, obj)
    return out


def run_strategy(args: argparse.Namespace, strategy: str) -> dict[str, Any]:
    """One run of lorafit's trainer in this torchrun process; one record for all ranks (rank 0's is kept)."""
    import torch

    import lorafit
    from lorafit.training import dist
    from lorafit.training.loop import Trainer

    rank, _, ws = dist.world()
    cfg = run_config(args, strategy, ws)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(lorafit.load_config(None, cfg), progress=False)
    t0 = time.perf_counter()
    try:
        trainer.run()
        mine = {"param_gib": local_param_bytes(trainer.model) / GIB,
                "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
                "params": sum(p.numel() for p in trainer.model.parameters()),
                "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
    finally:
        trainer.close()
    wall = time.perf_counter() - t0
    ranks = gather(mine)
    del trainer
    rec = {"strategy": strategy, "world_size": ws, "wall_s": round(wall, 1), "config": cfg,
           "peak_gib_per_rank": [r["peak_gib"] for r in ranks], "param_gib_per_rank": [r["param_gib"] for r in ranks],
           "params": mine["params"], "trainable_params": mine["trainable"]}
    if rank == 0:
        recs = [json.loads(line) for line in (Path(cfg["output_dir"]) / "log.jsonl").read_text().splitlines()]
        start = next(r for r in recs if r.get("event") == "start")
        train = [r for r in recs if r["type"] == "train"]
        rates = [r["tokens_per_s"] for r in train if r["step"] > args.warmup] or [r["tokens_per_s"] for r in train]
        tps = statistics.median(rates)
        rec.update(step_kind=start.get("step_kind"), step_fallback=start.get("step_fallback"),
                   distributed=start.get("distributed"), tokens_per_s=tps, tokens_per_s_per_gpu=tps / ws,
                   step_s_median=ws * args.batch * args.length / tps, losses=[r["loss"] for r in train],
                   grad_norms=[r["grad_norm"] for r in train], tokens_per_s_all=[r["tokens_per_s"] for r in train])
        peak = rec["peak_gib_per_rank"][0]
        print(f"  N={ws} {strategy:<6} {tps:>10,.0f} tok/s  {1000 * rec['step_s_median']:8.1f} ms/step  "
              + ("" if peak is None else f"peak {max(rec['peak_gib_per_rank']):6.2f} GiB  ")
              + f"params {rec['param_gib_per_rank'][0]:.2f} GiB/rank  [{rec['step_kind']}]", flush=True)
    return rec


def worker(args: argparse.Namespace) -> None:
    import traceback

    import torch

    from lorafit.training import dist

    rank, local, ws = dist.world()
    if args.device == "cuda":
        torch.cuda.set_device(local)
    asked = args.strategy.split(",")
    if ws == 1:  # the baselines: the plain single-GPU run for ddp/fsdp, the single-GPU graph run for graph
        strategies = (["single"] if {"ddp", "fsdp"} & set(asked) else []) + (["graph"] if "graph" in asked else [])
    else:
        strategies = asked
    runs: dict[str, Any] = {}
    for s in strategies:
        try:
            runs[s] = run_strategy(args, s)
        except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
            traceback.print_exc()
            runs[s] = {"error": f"{type(e).__name__}: {e}"}
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rec = {"device": torch.cuda.get_device_name(local) if args.device == "cuda" else f"cpu ({platform.machine()})",
               "world_size": ws, "backend": "nccl" if args.device == "cuda" else "gloo", "model": args.model,
               "torch": torch.__version__, "settings": {k: getattr(args, k) for k in ("batch", "length", "steps", "warmup")},
               "lora": "r16 alpha32 dropout0.1 all-linear; lorafit's trainer (Trainer.run) per strategy", "runs": runs}
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
            table[f"{s}-n{n}"] = {"tokens_per_s": r["tokens_per_s"], "speedup_vs_1": ratio, "step_kind": r.get("step_kind"),
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
    import torch

    ns = [int(x) for x in args.sweep.split(",")]
    have = torch.cuda.device_count() if args.device == "cuda" else max(ns)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_model_folder(args.model, work / args.model, device=args.device)
    write_long_examples(work / f"long-{args.length}.json", 64, args.length)
    shutil.rmtree(work / "runs", ignore_errors=True)  # a finished run there would be taken as done
    per_n, skipped = {}, []
    passthrough = ["--model", args.model, "--strategy", args.strategy, "--device", args.device, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--length", str(args.length),
                   "--work", str(work), "--out", str(out)]
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
    ap.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES), help="the shape of the random-weight model")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="rows per GPU (batch_size)")
    ap.add_argument("--length", type=int, default=1024, help="tokens per row (max_length)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per torchrun launch (driver)")
    ap.add_argument("--work", default="/tmp/bench-dist", help="model folder, data and run folders")
    ap.add_argument("--out", default="benchmarks/results/dist")
    args = ap.parse_args()
    if any(s not in ("ddp", "fsdp", "graph") for s in args.strategy.split(",")):
        ap.error("--strategy: ddp, fsdp and/or graph")
    sweep(args) if args.sweep else worker(args)


if __name__ == "__main__":
    main()
