"""Micro-benchmark of one decoder layer's LoRA projections (Llama-3-8B sizes, 2,048 rows), each op
sequence captured as a CUDA graph: run 3's path (frozen GEMM, then the rank-r product added with
addmm_) against folding s*B into the frozen GEMM ([x | u] @ [W | s*B]^T forward, dy @ [W | s*B]
backward gives dx and du in one GEMM), and what FP8 frozen GEMMs would give.

    python benchmarks/micro_fold.py --out $OUT/micro_fold.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from graph_timer import timed

N = 2048
GROUPS = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
          "down": (14336, [4096])}
R = 16


def group_bench(name: str, d_in: int, outs: list[int]) -> dict:
    dev, dt = "cuda", torch.bfloat16
    k = len(outs)
    rr = R * k
    x = torch.randn(N, d_in, device=dev, dtype=dt)
    xd = x * 1.1
    ws = [torch.randn(o, d_in, device=dev, dtype=dt) / 64 for o in outs]
    a_cat = torch.randn(rr, d_in, device=dev, dtype=dt) / 64
    bs = [torch.randn(o, R, device=dev, dtype=dt) / 4 for o in outs]
    dys = [torch.randn(N, o, device=dev, dtype=dt) for o in outs]
    wcat = []
    for i, (w, b) in enumerate(zip(ws, bs)):
        c = torch.zeros(w.shape[0], d_in + rr, device=dev, dtype=dt)
        c[:, :d_in] = w
        c[:, d_in + R * i:d_in + R * (i + 1)] = b
        wcat.append(c)
    xwide = torch.zeros(N, d_in + rr, device=dev, dtype=dt)
    res: dict = {}

    def cur_fwd():
        u = xd @ a_cat.t()
        for i, (w, b) in enumerate(zip(ws, bs)):
            y = x @ w.t()
            y.addmm_(u[:, R * i:R * (i + 1)], b.t())

    def cur_bwd():
        u = xd @ a_cat.t()
        dx, dus = None, []
        for i, (dy, w, b) in enumerate(zip(dys, ws, bs)):
            dx = dy @ w if dx is None else dx.addmm_(dy, w)
            dus.append(dy @ b)
            torch.mm(dy.t(), u[:, R * i:R * (i + 1)], out_dtype=torch.float32)
        du = torch.cat(dus, 1)
        torch.mm(du.t(), xd, out_dtype=torch.float32)
        dx.addmm_(du, a_cat)

    def fold_fwd(copy: bool):
        def f():
            if copy:
                xwide[:, :d_in].copy_(x)
            xwide[:, d_in:].copy_(xd @ a_cat.t())
            for c in wcat:
                c[:, d_in:].copy_(c[:, d_in:])  # the per-step refresh of s*B (tiny)
                xwide @ c.t()
        return f

    def fold_bwd():
        u = xwide[:, d_in:]
        g = None
        for i, (dy, c) in enumerate(zip(dys, wcat)):
            g = dy @ c if g is None else g.addmm_(dy, c)
            torch.mm(dy.t(), u[:, R * i:R * (i + 1)], out_dtype=torch.float32)
        du = g[:, d_in:]
        torch.mm(du.t(), xd, out_dtype=torch.float32)
        dx = g[:, :d_in]
        dx.addmm_(du, a_cat)

    def frozen_only():
        for w, dy in zip(ws, dys):
            x @ w.t()
            dy @ w

    res["current_fwd_ms"] = timed(cur_fwd)
    res["current_bwd_ms"] = timed(cur_bwd)
    res["fold_fwd_copy_ms"] = timed(fold_fwd(True))
    res["fold_fwd_nocopy_ms"] = timed(fold_fwd(False))
    res["fold_bwd_ms"] = timed(fold_bwd)
    res["frozen_gemms_only_ms"] = timed(frozen_only)
    # FP8 frozen GEMMs (e4m3 x and W, per-tensor scales), forward only, as a bound on that lever
    try:
        x8 = x.to(torch.float8_e4m3fn)
        w8 = [w.to(torch.float8_e4m3fn) for w in ws]
        one = torch.ones((), device=dev)

        def fp8_fwd():
            for w in w8:
                torch._scaled_mm(x8, w.t(), one, one, out_dtype=dt)

        def bf16_fwd():
            for w in ws:
                x @ w.t()
        res["fp8_frozen_fwd_ms"] = timed(fp8_fwd)
        res["bf16_frozen_fwd_ms"] = timed(bf16_fwd)
    except Exception as e:  # noqa: BLE001
        res["fp8_error"] = repr(e)[:200]
    print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "rows": N, "rank": R,
           "groups": {name: group_bench(name, d, o) for name, (d, o) in GROUPS.items()}}
    tot = {k: 32 * sum(g[k] for g in out["groups"].values() if k in g)
           for k in next(iter(out["groups"].values())) if k.endswith("_ms")}
    out["per_step_32_layers_ms"] = tot
    print("per step (32 layers):", {k: round(v, 2) for k, v in tot.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
