"""Where lorafit's fused training step spends GPU time: torch.profiler over eager steps of the
Llama-3-8B shape (kernel times equal the graph replay's; only the host gaps differ).

    PYTHONPATH=src python benchmarks/profile_step.py --model llama3-8b --flags '{}' --out $OUT/profile.json

Writes per-kernel and per-op (with input shapes) CUDA time per step, largest first.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from speed_common import SHAPES, build, random_batches  # noqa: E402

from lorafit.kernels import accelerate_model, causal_lm_loss  # noqa: E402


def _device_us(ev) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(ev, name):
            return float(getattr(ev, name))
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--flags", type=json.loads, default={}, help="accelerate_model keyword arguments (JSON)")
    ap.add_argument("--baseline", action="store_true", help="profile HF + PEFT instead")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    model = build(args.model)
    if not args.baseline:
        accelerate_model(model, **args.flags)
    model.train()
    batches = random_batches(model.config.vocab_size, 4, 2, 1024, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step(batch: dict) -> None:
        loss = model(**batch).loss if args.baseline else causal_lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(batches[i % 4])
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for i in range(args.steps):
            step(batches[i % 4])
        torch.cuda.synchronize()
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
    print(f"GPU kernel time per step: {total:.1f} ms")
    for name, ms, n in kernels[:45]:
        print(f"{ms:8.2f} ms {n:6d}x  {name[:110]}")
    print("--- aten ops (device time incl. children) ---")
    for name, shapes, ms, n in ops[:60]:
        print(f"{ms:8.2f} ms {n:6d}x  {name} {shapes}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "model": args.model, "flags": args.flags,
        "baseline": args.baseline, "gpu_ms_per_step": total,
        "kernels": [{"name": n, "ms": round(m, 3), "count": c} for n, m, c in kernels],
        "ops": [{"op": n, "shapes": s, "ms": round(m, 3), "count": c} for n, s, m, c in ops]}, indent=1))


if __name__ == "__main__":
    main()
