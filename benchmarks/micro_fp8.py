"""Micro-benchmark of one Llama-3-8B decoder layer's fused LoRA groups (2,048 rows, r 16, seeded dropout 0.1)
with the frozen GEMMs in bf16 and in FP8 (`quantize_base: fp8`: activations quantized per token, weights
per channel), forward + backward through `lorafit.kernels.lora_group` as the trainer calls it, each replayed
from a CUDA graph; plus the error of the FP8 group's outputs and input gradient against bf16's, and odd row
counts (eager padded batches) through the FP8 GEMM.

    python benchmarks/micro_fp8.py --out $OUT/micro-fp8.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from graph_timer import timed

from lorafit.kernels import DropoutSeed, LoraProj, lora_group
from lorafit.kernels.fp8 import Fp8Weights, fp8_matmul, quantize_rows

N, R, P = 2048, 16, 0.1
GROUPS = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
          "down": (14336, [4096])}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def group_bench(d_in: int, outs: list[int]) -> dict:
    dev, dt = "cuda", torch.bfloat16
    projs = [LoraProj(torch.randn(o, d_in, device=dev, dtype=dt) / d_in ** 0.5, None,
                      (torch.randn(R, d_in, device=dev) / d_in ** 0.5).requires_grad_(),
                      (torch.randn(o, R, device=dev) * 0.01).requires_grad_(), 2.0) for o in outs]
    x = torch.randn(N, d_in, device=dev, dtype=dt).requires_grad_()
    dys = [torch.randn(N, o, device=dev, dtype=dt) for o in outs]
    seed = DropoutSeed(torch.device(dev))
    fp8 = Fp8Weights()

    def step(cache):
        def f():
            ys = lora_group(x, projs, P, True, seed=(seed.value, 3), fp8=cache)
            torch.autograd.backward(ys, dys)
        return f

    res = {"bf16_ms": timed(step(None)), "fp8_ms": timed(step(fp8))}
    x.grad = None
    y16 = lora_group(x, projs, 0.0, False)
    torch.autograd.backward(y16, dys)
    g16, x.grad = x.grad, None
    y8 = lora_group(x, projs, 0.0, False, fp8=fp8)
    torch.autograd.backward(y8, dys)
    res["fp8_rel_err_y"] = max(rel(a, b) for a, b in zip(y8, y16))
    res["fp8_rel_err_dx"] = rel(x.grad, g16)
    res["quantize_ms"] = timed(lambda: quantize_rows(x.detach()))
    print(d_in, outs, {k: round(v, 4) for k, v in res.items()}, flush=True)
    return res


def gemm_scaling() -> dict:
    """The frozen GEMMs alone, forward and dx shapes of one layer x 32: bf16, FP8 with row-wise scales (what
    quantize_base: fp8 runs) and FP8 with one scale per tensor (cuBLAS's classic FP8 path)."""
    dev, dt = "cuda", torch.bfloat16
    shapes = [(d_in, o) for d_in, outs in GROUPS.values() for o in outs]
    mats = []
    for d_in, o in shapes:
        w = torch.randn(o, d_in, device=dev, dtype=dt)
        x, dy = torch.randn(N, d_in, device=dev, dtype=dt), torch.randn(N, o, device=dev, dtype=dt)
        qx, qw, qdy, qwt = quantize_rows(x), quantize_rows(w), quantize_rows(dy), quantize_rows(w.t().contiguous())
        mats.append((x, w, dy, qx, qw, qdy, qwt))
    one = torch.ones((), device=dev)

    def bf16():
        for x, w, dy, *_ in mats:
            x @ w.t()
            dy @ w

    def rowwise():
        for _, _, _, qx, qw, qdy, qwt in mats:
            torch._scaled_mm(qx[0], qw[0].t(), scale_a=qx[1], scale_b=qw[1].view(1, -1), out_dtype=dt)
            torch._scaled_mm(qdy[0], qwt[0].t(), scale_a=qdy[1], scale_b=qwt[1].view(1, -1), out_dtype=dt)

    def tensorwise():
        for _, _, _, qx, qw, qdy, qwt in mats:
            torch._scaled_mm(qx[0], qw[0].t(), scale_a=one, scale_b=one, out_dtype=dt)
            torch._scaled_mm(qdy[0], qwt[0].t(), scale_a=one, scale_b=one, out_dtype=dt)

    res = {name: 32 * timed(fn) for name, fn in (("bf16_ms", bf16), ("fp8_rowwise_ms", rowwise),
                                                    ("fp8_tensorwise_ms", tensorwise))}
    print("frozen GEMMs a step (32 layers):", {k: round(v, 2) for k, v in res.items()}, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": N, "rank": R, "dropout": P,
           "groups": {name: group_bench(d, o) for name, (d, o) in GROUPS.items()}}
    out["per_step_32_layers_ms"] = {k: 32 * sum(g[k] for g in out["groups"].values())
                                    for k in ("bf16_ms", "fp8_ms", "quantize_ms")}
    # odd row counts (an eager padded batch of 2 x 37 tokens): the GEMM takes them, padded where it must be
    a = torch.randn(74, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    qa, qw = quantize_rows(a), quantize_rows(w)
    y = fp8_matmul(*qa, qw[0], qw[1].view(1, -1), torch.bfloat16)
    out["odd_rows"] = {"shape": list(y.shape), "rel_err": rel(y, a @ w.t())}
    out["gemm_scaling"] = gemm_scaling()
    print("per step:", out["per_step_32_layers_ms"], "odd rows:", out["odd_rows"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
