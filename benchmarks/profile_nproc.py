"""Where a step of `lorafit train --nproc N` spends its time on each GPU, against one GPU: a timeline profile.

    python benchmarks/bench_nproc.py run ...           # builds the model folder (or any earlier call did)
    torchrun --nproc_per_node 2 benchmarks/profile_nproc.py --set gradient_accumulation_steps=1 --out $OUT/two
    python benchmarks/profile_nproc.py --set gradient_accumulation_steps=2 --out $OUT/one

Why: the cost model (`nproc_model.py`) says what the 1.9x target depends on (the optimizer's tail, the
exposed all-reduce, uneven micro-batches); this measures it. Each rank runs lorafit's trainer
(`lorafit.training.loop.Trainer`, bench_nproc's config: the 8B-shape folder, Bitext, the write-up's
settings) and records `--steps` optimizer steps after `--skip` with torch.profiler. From each rank's
kernel timeline it writes: wall time per step, GPU busy time (the union of all kernels), time in NCCL
kernels and how much of it overlaps compute kernels, the gaps on the GPU (idle), and the kernels after the
last backward kernel of a step (the tail: norm, clipping, AdamW, zeroing) -- the numbers a change to the
step's tail or to the all-reduce should move.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _union(iv: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(iv):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Time covered by both interval sets."""
    return _union(a) + _union(b) - _union(a + b)


def summarise(trace: Path, steps: int) -> dict[str, Any]:
    ev = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted(((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev
                      if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("dur", 0) > 0))
    if not kernels:
        return {"error": "no kernels recorded"}
    nccl = [(a, b) for a, b, n in kernels if "nccl" in n.lower()]
    comp = [(a, b) for a, b, n in kernels if "nccl" not in n.lower()]
    span = kernels[-1][1] - kernels[0][0]
    busy = _union([(a, b) for a, b, _ in kernels])
    gaps = sorted((b2[0] - b1[1] for b1, b2 in zip(kernels, kernels[1:]) if b2[0] - b1[1] > 50), reverse=True)
    by_name: dict[str, list[float]] = {}
    for a, b, n in kernels:
        by_name.setdefault(n[:90], []).append(b - a)
    tail_words = ("adam", "multi_tensor", "norm_kernel", "reduce_kernel", "fill", "zero")
    tail = {n: round(sum(d) / steps / 1000, 4) for n, d in by_name.items()
            if any(w in n.lower() for w in tail_words) and sum(d) / steps > 5}
    top = sorted(((round(sum(d) / steps / 1000, 3), len(d) // steps, n) for n, d in by_name.items()), reverse=True)[:25]
    return {"steps": steps, "span_ms_per_step": round(span / steps / 1000, 3),
            "busy_ms_per_step": round(busy / steps / 1000, 3),
            "idle_ms_per_step": round((span - busy) / steps / 1000, 3),
            "nccl_ms_per_step": round(_union(nccl) / steps / 1000, 3),
            "nccl_overlapping_compute_ms_per_step": round(_overlap(nccl, comp) / steps / 1000, 3),
            "compute_ms_per_step": round(_union(comp) / steps / 1000, 3),
            "gaps_over_50us_ms_per_step": round(sum(gaps) / steps / 1000, 3),
            "largest_gaps_us": [round(g) for g in gaps[:12]],
            "kernels_per_step": len(kernels) // steps,
            "tail_kernels_ms_per_step": tail, "top_kernels": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "benchmarks" / "data-nproc"))
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-shape")
    ap.add_argument("--skip", type=int, default=60, help="optimizer steps before the profiled ones")
    ap.add_argument("--steps", type=int, default=20, help="profiled optimizer steps")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config keys (YAML values)")
    ap.add_argument("--out", required=True, help="a folder: one JSON per rank")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import lorafit
    from lorafit.training.loop import Trainer

    rank = int(os.environ.get("RANK", "0"))
    data = Path(args.data).resolve()
    work = Path(tempfile.gettempdir()) / "profile-nproc"
    cfg = {"model": args.model_dir, "data": [str(data / "train.json")], "max_steps": args.skip + args.steps + 2,
           "logging_steps": 5, "eval_steps": 10 ** 6, "save_steps": 10 ** 6, "seed": 0, "device": "cuda",
           "output_dir": str(work / "run")}
    for kv in args.set:
        k, _, v = kv.partition("=")
        cfg[k] = yaml.safe_load(v)
    if rank == 0:
        shutil.rmtree(cfg["output_dir"], ignore_errors=True)
    prof = profile(activities=[ProfilerActivity.CUDA],
                   schedule=schedule(wait=args.skip, warmup=2, active=args.steps, repeat=1))

    class Profiled(Trainer):
        def launch(self, step: int) -> Any:
            out = super().launch(step)
            prof.step()
            return out

    trainer = Profiled(lorafit.load_config(None, cfg), progress=False)
    if rank:  # wait for rank 0 to clear the folder
        import time

        time.sleep(2)
    try:
        with prof:
            trainer.run()
    finally:
        trainer.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = work / f"trace-{rank}.json"
    prof.export_chrome_trace(str(trace))
    res = {"rank": rank, "config": cfg, "device": torch.cuda.get_device_name(), **summarise(trace, args.steps)}
    if rank == 0:
        recs = [json.loads(x) for x in (Path(cfg["output_dir"]) / "log.jsonl").read_text().splitlines()]
        res["tokens_per_s"] = [r["tokens_per_s"] for r in recs if r.get("type") == "train"]
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("config", "top_kernels", "tokens_per_s")}))


if __name__ == "__main__":
    main()
