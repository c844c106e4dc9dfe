"""Fused LoRA projections: one pass over the input for a group of projections that share it.

A group is k frozen linear layers fed the same input x (q, k, v; or gate, up; or one alone), each with an
adapter (A_i: r_i x in, B_i: out_i x r_i, scale s_i) and one dropout D(x) = x * m / (1 - p):
    u = D(x) [A_1; ...; A_k]^T                       (one GEMM over x for every adapter of the group)
    y_i = x W_i^T + b_i + s_i u_i B_i^T              (the small product first, the GEMM adds to it)
Backward, given dy_i (no gradient for the frozen W_i, b_i):
    du_i = s_i dy_i B_i,    dB_i = s_i dy_i^T u_i,    dA = du^T D(x)   (du = [du_1 ... du_k])
    dx   = sum_i dy_i W_i + (du [A_1; ...; A_k]) * m / (1 - p)
All products run in the model dtype on tensor cores; A and B stay float32 parameters (cast once per
forward by `AdapterCache`, else per call) and their gradients are accumulated in float32. When the
group shares one scaling s (the usual case), u is stored as s u, so s costs one scaling per group
instead of one per projection. Saved: D(x), the dropout mask (1 byte an element) and u -- not x in
float32, not per-projection dropped copies, not y. With seeded dropout (`lorafit.kernels.dropout`)
only x and u are saved: the mask is drawn again inside the rank-r products (u = D(x) A^T,
dA = du^T D(x), dx = D'(du A) + sum_i dy_i W_i), so D(x) never reaches memory.

How this differs from PEFT: PEFT casts x to float32, draws an independent dropout mask for every
projection and runs the rank-r products in float32 without tensor cores. Here the projections of one
input share one mask (same expectation and variance per projection; the noise is correlated across
them). Pass groups of one projection to keep PEFT's independent masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ._triton import use_triton
from .dropout import dropout_matmul, dropout_matmul_t, matmul_dropout
from .fp8 import Fp8Weight, Fp8Weights, fp8_matmul, quantize_rows

__all__ = ["AdapterCache", "LoraProj", "lora_group", "lora_group_reference"]


@dataclass
class LoraProj:
    """One projection: a frozen base (weight, bias) and, unless lora_A is None, its adapter."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    scaling: float


_OUT_DTYPE_MM: bool | None = None


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32 (a gradient of a float32 parameter)."""
    global _OUT_DTYPE_MM
    if a.is_cuda and a.dtype != torch.float32 and _OUT_DTYPE_MM is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_MM = True
            return out
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=) for this dtype
            _OUT_DTYPE_MM = False
    return torch.mm(a, b).float()


class AdapterCache:
    """Model-dtype copies of every group's A (concatenated) and B, refreshed once per forward.

    Why: casting the float32 adapters inside each call costs a cat, a cast and a scale for every group
    and projection -- about 20 tiny kernels a decoder layer, which a CUDA-graph step pays in launch gaps.
    `refresh()` redoes all copies in a few multi-tensor kernels (`torch._foreach_copy_`). Groups register
    on first use; `lorafit.kernels.accelerate_model` refreshes before every decoder forward.
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}

    def get(self, a_s: Sequence[torch.Tensor], b_s: Sequence[torch.Tensor],
            dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(cat(A) in dtype, [B_i in dtype]) for these parameters, registering them on first sight."""
        key = tuple(id(t) for t in (*a_s, *b_s))
        entry = self._groups.get(key)
        if entry is None or entry[2].dtype != dtype:
            a_buf = torch.empty((sum(a.shape[0] for a in a_s), a_s[0].shape[1]), dtype=dtype, device=a_s[0].device)
            views, off = [], 0
            for a in a_s:
                views.append(a_buf[off:off + a.shape[0]])
                off += a.shape[0]
            b_bufs = [torch.empty(b.shape, dtype=dtype, device=b.device) for b in b_s]
            entry = ([*a_s, *b_s], [*views, *b_bufs], a_buf)
            self._groups[key] = entry
            with torch.no_grad():
                torch._foreach_copy_(entry[1], entry[0])
        return entry[2], entry[1][len(a_s):]

    def refresh(self) -> None:
        if self._groups:
            with torch.no_grad():
                src = [t for e in self._groups.values() for t in e[0]]
                dst = [t for e in self._groups.values() for t in e[1]]
                torch._foreach_copy_(dst, src)


class _LoraGroupFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor | None, p: float, scalings: tuple[float, ...],
                seed: torch.Tensor | None, site: int, cast: tuple | None, fp8: tuple[Fp8Weight | None, ...] | None,
                *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        k = len(scalings)
        weights, biases, a_s, b_s = params[:k], params[k:2 * k], params[2 * k:3 * k], params[3 * k:]
        lead, dt = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a_cat, b_cast = cast if cast is not None else (torch.cat(a_s).to(dt), [b.to(dt) for b in b_s])
        seeded = p > 0 and seed is not None
        # One scaling for the group (the usual case): u is stored already scaled (u = s D(x) A^T) and B is
        # used as cast -- one scaling per group, and none at all on the seeded path, where s rides in the
        # Triton products' scale argument. Mixed scalings scale each B instead.
        folded = len(set(scalings)) == 1
        s0 = scalings[0] if folded else 1.0
        if seeded:  # mask from (seed, site), drawn inside the products: D(x) is never written nor saved
            x2 = x2.contiguous()
            xd, mask = x2, None
        elif p > 0 and mask is None:
            xd, mask = torch.native_dropout(x2, p, True)
        elif p > 0:
            mask = mask.reshape(x2.shape)
            xd = x2 * mask * (1.0 / (1.0 - p))
        else:
            xd, mask = x2, None
        if seeded:
            u = dropout_matmul(x2, a_cat, seed, site, p, alpha=s0)
        else:
            u = xd @ a_cat.t()
            if s0 != 1.0:
                u.mul_(s0)
        ranks = [a.shape[0] for a in a_s]
        if fp8 is not None and all(f is None for f in fp8):
            fp8 = None
        x8 = quantize_rows(x2) if fp8 is not None else None  # once for the group's frozen GEMMs
        outs, b_used, off = [], [], 0
        for i, (w, bias, b, s, r) in enumerate(zip(weights, biases, b_cast, scalings, ranks)):
            bs = b if folded else b * s
            ub = u[:, off:off + r]
            if x8 is not None and fp8[i] is not None:  # FP8 GEMMs cannot accumulate into y: the small product adds
                y = fp8_matmul(*x8, fp8[i].w, fp8[i].w_scale, dt)
                y.addmm_(ub, bs.t())
                if bias is not None:
                    y.add_(bias)
            else:
                # The small product is written first and the frozen GEMM adds to it in its epilogue: y is
                # written once and read once, where GEMM-then-addmm_ writes it twice and reads it once.
                y = torch.mm(ub, bs.t()) if bias is None else torch.addmm(bias, ub, bs.t())
                y.addmm_(x2, w.t())
            outs.append(y.view(*lead, y.shape[-1]))
            b_used.append(bs)
            off += r
        ctx.save_for_backward(xd, mask, u, a_cat, seed if seeded else None, *weights, *b_used)
        ctx.meta = (k, p, scalings, ranks, x.shape, [a.dtype for a in a_s], [b.dtype for b in b_s], site, folded)
        ctx.fp8 = fp8
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor | None):
        k, p, scalings, ranks, x_shape, a_dtypes, b_dtypes, site, folded = ctx.meta
        xd, mask, u, a_cat, seed, *rest = ctx.saved_tensors  # xd is x itself when seeded
        weights, b_used = rest[:k], rest[k:]
        n = xd.shape[0]
        need_x = ctx.needs_input_grad[0]
        flat = [None if dy is None else dy.reshape(n, dy.shape[-1]) for dy in dys]
        du_parts, d_b, off = [], [], 0
        for i, (dy, r) in enumerate(zip(flat, ranks)):
            if dy is None:
                du_parts.append(u.new_zeros((n, r)))
                d_b.append(torch.zeros_like(b_used[i], dtype=b_dtypes[i]))
            else:
                du_parts.append(dy @ b_used[i])
                d_b_i = _mm_f32(dy.t(), u[:, off:off + r])  # u already carries s when folded
                d_b.append((d_b_i if folded else d_b_i * scalings[i]).to(b_dtypes[i]))
            off += r
        du = torch.cat(du_parts, dim=1)  # when folded, du lacks the factor s: alpha puts it back
        alpha = scalings[0] if folded else 1.0
        dx = None
        if seed is not None:  # the adapter's share of dx is written first; the frozen GEMMs add to it
            d_a_cat = dropout_matmul_t(du, xd, seed, site, p, alpha=alpha)
            if need_x:
                dx = matmul_dropout(du, a_cat, seed, site, p, alpha=alpha)
        else:
            d_a_cat = _mm_f32(du.t(), xd)
            if alpha != 1.0:
                d_a_cat.mul_(alpha)
        d_a = [g.to(dt) for g, dt in zip(d_a_cat.split(ranks), a_dtypes)]
        if need_x:
            for i, (dy, w) in enumerate(zip(flat, weights)):
                if dy is None:
                    continue
                if ctx.fp8 is not None and ctx.fp8[i] is not None:
                    part = fp8_matmul(*quantize_rows(dy), ctx.fp8[i].wt, ctx.fp8[i].wt_scale, dy.dtype)
                    dx = part if dx is None else dx.add_(part)
                else:
                    dx = dy @ w if dx is None else dx.addmm_(dy, w)
            if seed is None:
                if dx is None:
                    dx = torch.zeros((n, x_shape[-1]), dtype=xd.dtype, device=xd.device)
                if mask is None:
                    dx.addmm_(du, a_cat, alpha=alpha)
                else:
                    dx.addcmul_(du @ a_cat, mask, value=alpha / (1.0 - p))
            dx = dx.view(x_shape)
        return (dx, None, None, None, None, None, None, None, *([None] * (2 * k)), *d_a, *d_b)


def _plain(t: torch.Tensor) -> bool:
    """A tensor the cache may copy from (not an FSDP/DTensor shard)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def lora_group(x: torch.Tensor, projs: Sequence[LoraProj], dropout: float = 0.0, training: bool = True,
               mask: torch.Tensor | None = None, seed: tuple[torch.Tensor, int] | None = None,
               cache: AdapterCache | None = None, fp8: Fp8Weights | None = None) -> list[torch.Tensor]:
    """y_i = x W_i^T + b_i + s_i D(x) A_i^T B_i^T for every projection, sharing x and one dropout mask.

    Projections without an adapter are plain frozen linears. `mask` (bool, shape of x) replaces the
    random draw, for tests. `seed` = (DropoutSeed.value, call site) draws the mask with the seeded
    Triton dropout instead (see lorafit.kernels.dropout; ignored where Triton cannot run). `cache`
    supplies the adapters already cast (plain tensors only, not DTensor shards). `fp8` runs the adapted
    projections' frozen GEMMs in FP8 from its copies of their weights (`lorafit.kernels.fp8`; a different
    computation from the model dtype's). Works on any device and dtype; on GPU every product hits tensor cores.
    """
    adapted = [i for i, pr in enumerate(projs) if pr.lora_A is not None]
    outs: list[torch.Tensor | None] = [None] * len(projs)
    for i, pr in enumerate(projs):
        if pr.lora_A is None:
            outs[i] = F.linear(x, pr.weight, pr.bias)
    if adapted:
        group = [projs[i] for i in adapted]
        p = dropout if training else 0.0
        seed_t, site = seed if seed is not None and mask is None and use_triton(x) else (None, 0)
        a_s, b_s = [pr.lora_A for pr in group], [pr.lora_B for pr in group]
        cast = cache.get(a_s, b_s, x.dtype) if cache is not None and all(_plain(t) for t in a_s + b_s) else None
        fp8_ws = None if fp8 is None else tuple(fp8.get(pr.weight) for pr in group)
        ys = _LoraGroupFn.apply(x, mask if p > 0 else None, p, tuple(float(pr.scaling) for pr in group),
                                seed_t, site, cast, fp8_ws, *[pr.weight for pr in group], *[pr.bias for pr in group],
                                *a_s, *b_s)
        for i, y in zip(adapted, ys):
            outs[i] = y
    return outs  # type: ignore[return-value]


def lora_group_reference(x: torch.Tensor, projs: Sequence[LoraProj], dropout: float = 0.0,
                         training: bool = True, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """PEFT's lora.Linear forward for each projection (x cast to the adapter dtype, float32 products)."""
    outs = []
    for pr in projs:
        y = F.linear(x, pr.weight, pr.bias)
        if pr.lora_A is not None:
            xa = x.to(pr.lora_A.dtype)
            if training and dropout > 0:
                xa = xa * mask * (1.0 / (1.0 - dropout)) if mask is not None else F.dropout(xa, dropout)
            y = (y + (xa @ pr.lora_A.t() @ pr.lora_B.t()) * pr.scaling).to(y.dtype)
        outs.append(y)
    return outs
