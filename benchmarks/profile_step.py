"""Where `lorafit train`'s step spends GPU time: torch.profiler over the trainer's own optimizer steps.

    python benchmarks/profile_step.py --model llama3-8b --out $OUT/profile.json                      # the defaults
    python benchmarks/profile_step.py --set fused_kernels=false --out $OUT/profile-eager.json         # any config key

The run is lorafit's trainer (`lorafit.training.loop.Trainer`) on a random-weight folder of the named shape
(`shapes.build_model_folder`) and synthetic examples of `--length` tokens (batch 2), so every step has
the same shape. The profiler records `--steps` optimizer steps after `--warmup` (CUDA warm-up and, on the
graph step, the captures): `launch` is the trainer's phase that issues a step, wrapped here only to tell the profiler
where a step ends. With the CUDA-graph step the kernels are those the graph replays; host gaps show as
the difference between wall time and GPU time. Writes per-kernel and per-op (with input shapes) CUDA
time per step, largest first.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from shapes import SHAPES, build_model_folder, write_long_examples


def _device_us(ev: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(ev, name):
            return float(getattr(ev, name))
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2, help="profiled optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the profiled ones")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config keys (YAML values)")
    ap.add_argument("--work", default="/tmp/bench-profile")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import lorafit
    from lorafit.training.loop import Trainer

    work = Path(args.work)
    model_dir = build_model_folder(args.model, work / args.model)
    data = write_long_examples(work / f"long-{args.length}.json", 64, args.length)
    cfg = {"model": str(model_dir), "data": [str(data)], "max_length": args.length, "batch_size": 2,
           "max_steps": args.warmup + args.steps, "warmup_steps": 0, "warmup_ratio": 0.0, "lr_scheduler": "constant",
           "logging_steps": 1, "eval_steps": 10 ** 6, "save_steps": 10 ** 6, "seed": 0, "device": "cuda",
           "output_dir": str(work / "run")}
    for kv in args.set:
        k, _, v = kv.partition("=")
        cfg[k] = yaml.safe_load(v)
    shutil.rmtree(cfg["output_dir"], ignore_errors=True)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                   schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1))

    class Profiled(Trainer):
        def launch(self, step: int) -> Any:  # the trainer's phase that issues one optimizer step
            out = super().launch(step)
            prof.step()
            return out

    trainer = Profiled(lorafit.load_config(None, cfg), progress=False)
    try:
        with prof:
            trainer.run()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (Path(cfg["output_dir"]) / "log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    rates = [r["tokens_per_s"] for r in records if r.get("type") == "train" and r.get("step", 0) > args.warmup]
    wall_ms = 1000 * 2 * args.length / sorted(rates)[len(rates) // 2] if rates else None
    kernels = [(ev.key, _device_us(ev) / args.steps / 1000, ev.count // args.steps)
               for ev in prof.key_averages() if ev.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted([k for k in kernels if k[1] > 0], key=lambda k: -k[1])
    total = sum(k[1] for k in kernels)
    ops = []
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.device_type != torch.autograd.DeviceType.CPU or not ev.key.startswith("aten::"):
            continue
        ms = float(getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0))) / args.steps / 1000
        if ms > 0.05:
            ops.append((ev.key, str(ev.input_shapes)[:160], ms, ev.count // args.steps))
    ops.sort(key=lambda o: -o[2])
    print(f"step: {start.get('step_kind')} {start.get('step_fallback') or ''}; GPU kernel time per step: {total:.1f} ms;"
          f" wall (profiled, median of the train records): {wall_ms and round(wall_ms, 1)} ms")
    for name, ms, n in kernels[:45]:
        print(f"{ms:8.2f} ms {n:6d}x  {name[:110]}")
    print("--- aten ops (device time incl. children) ---")
    for name, shapes, ms, n in ops[:60]:
        print(f"{ms:8.2f} ms {n:6d}x  {name} {shapes}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "model": args.model, "config": cfg, "step_kind": start.get("step_kind"),
        "gpu_ms_per_step": total, "wall_ms_per_step": wall_ms,
        "kernels": [{"name": n, "ms": round(m, 3), "count": c} for n, m, c in kernels],
        "ops": [{"op": n, "shapes": s, "ms": round(m, 3), "count": c} for n, s, m, c in ops]}, indent=1))


if __name__ == "__main__":
    main()
