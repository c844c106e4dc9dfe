"""The optimizer step's GPU time on LoRA's parameters (Llama-3-8B shape, r 16, all linear layers): torch's fused
AdamW over the 448 adapter tensors against one flat tensor of the same size, and the bf16 refresh copy.

    python benchmarks/micro_adamw.py --out $OUT/micro-adamw.json
"""
from __future__ import annotations

import argparse
import json

import torch

SHAPES = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]


def timed(fn, n: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    r, dev = a.rank, "cuda"
    shapes = [s for _ in range(a.layers) for i, o in SHAPES for s in ((r, i), (o, r))]
    params = [torch.randn(s, device=dev) * 0.01 for s in shapes]
    n = sum(p.numel() for p in params)
    res = {"tensors": len(params), "elements": n, "device": torch.cuda.get_device_name()}
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(ps, lr=1e-4, fused=True)
    res["fused_adamw_448_ms"] = timed(opt.step)
    opt.grad_scale = torch.tensor(2.0, device=dev)
    opt.found_inf = torch.tensor(0.0, device=dev)
    res["fused_adamw_448_scaled_ms"] = timed(opt.step)
    flat = torch.nn.Parameter(torch.cat([p.reshape(-1) for p in params]))
    flat.grad = torch.randn_like(flat) * 1e-3
    opt1 = torch.optim.AdamW([flat], lr=1e-4, fused=True)
    res["fused_adamw_flat_ms"] = timed(opt1.step)
    optf = torch.optim.AdamW(ps, lr=1e-4, foreach=True)
    res["foreach_adamw_448_ms"] = timed(optf.step)
    bf = [torch.empty_like(p, dtype=torch.bfloat16) for p in params]
    res["refresh_copy_448_ms"] = timed(lambda: torch._foreach_copy_(bf, ps))
    res["norm_flat_ms"] = timed(lambda: torch.linalg.vector_norm(flat.grad))
    res["zero_flat_ms"] = timed(lambda: flat.grad.zero_())
    res["bytes_adamw_GB"] = 28 * n / 1e9
    print(json.dumps(res, indent=1))
    if a.out:
        open(a.out, "w").write(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
