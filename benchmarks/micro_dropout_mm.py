"""Tile sizes for the seeded dropout products (lorafit.kernels.dropout) at Llama-3-8B sizes, each call
replayed from a CUDA graph, against what they replace (dropout kernel + cuBLAS + addcmul).

    python benchmarks/micro_dropout_mm.py --out $OUT/micro_dropout_mm.json
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from graph_timer import timed

from lorafit.kernels import dropout as D

N = 2048
SHAPES = {"qkv": (4096, 48), "o": (4096, 16), "gate_up": (4096, 32), "down": (14336, 16)}


def sweep(fn, grid: dict) -> list[tuple[float, dict]]:
    out = []
    keys = list(grid)
    for values in itertools.product(*grid.values()):
        cfg = dict(zip(keys, values))
        try:
            out.append((timed(lambda: fn(cfg), reps=30), cfg))
        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory)
            out.append((float("inf"), {**cfg, "error": type(e).__name__}))
    return sorted(out, key=lambda t: t[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev, dt, p = "cuda", torch.bfloat16, 0.1
    seed = D.DropoutSeed(dev, 3)
    res: dict = {"device": torch.cuda.get_device_name(), "rows": N, "shapes": {}}
    for name, (k, r) in SHAPES.items():
        x = torch.randn(N, k, device=dev, dtype=dt)
        a = torch.randn(r, k, device=dev, dtype=dt)
        g = torch.randn(N, r, device=dev, dtype=dt)
        dx = torch.randn(N, k, device=dev, dtype=dt)
        row: dict = {}

        def old_fwd():
            xd, m = torch.native_dropout(x, p, True)
            xd @ a.t()
            return m

        mask = old_fwd()

        def old_bwd():
            torch.mm(g.t(), x, out_dtype=torch.float32)
            dx.addcmul_(g @ a, mask, value=1 / (1 - p))

        row["old_fwd_ms"], row["old_bwd_ms"] = timed(old_fwd), timed(old_bwd)
        row["default_fwd_ms"] = timed(lambda: D.dropout_matmul(x, a, seed.value, 1, p))
        row["default_grad_a_ms"] = timed(lambda: D.dropout_matmul_t(g, x, seed.value, 1, p))
        row["default_grad_x_ms"] = timed(lambda: D.matmul_dropout(g, a, seed.value, 1, p))
        fwd = sweep(lambda c: D.dropout_matmul(x, a, seed.value, 1, p, c),
                    dict(bm=[32, 64, 128], bk=[64, 128], warps=[4, 8], stages=[3], programs=[132, 264, 528]))
        ga = sweep(lambda c: D.dropout_matmul_t(g, x, seed.value, 1, p, c),
                   dict(bm=[32, 64, 128], bn=[64, 128, 256], warps=[4, 8], stages=[3], programs=[132, 264, 528]))
        gx = sweep(lambda c: D.matmul_dropout(g, a, seed.value, 1, p, c),
                   dict(bm=[32, 64, 128], bn=[64, 128, 256], warps=[4, 8], stages=[2, 3]))
        for key, table in (("fwd", fwd), ("grad_a", ga), ("grad_x", gx)):
            row[f"best_{key}"] = [{"ms": round(t, 4), **c} for t, c in table[:5]]
        res["shapes"][name] = row
        print(name, {kk: (round(v, 4) if isinstance(v, float) else v[0]) for kk, v in row.items()}, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
