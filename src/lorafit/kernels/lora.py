"""Fused LoRA projections: one pass over the input for a group of projections that share it.

A group is k frozen linear layers fed the same input x (q, k, v; or gate, up; or one alone), each with an
adapter (A_i: r_i x in, B_i: out_i x r_i, scale s_i) and one dropout D(x) = x * m / (1 - p):
    u = D(x) [A_1; ...; A_k]^T                       (one GEMM over x for every adapter of the group)
    y_i = x W_i^T + b_i + s_i u_i B_i^T              (the small product added inside the GEMM, addmm_)
Backward, given dy_i (no gradient for the frozen W_i, b_i):
    du_i = s_i dy_i B_i,    dB_i = s_i dy_i^T u_i,    dA = du^T D(x)   (du = [du_1 ... du_k])
    dx   = sum_i dy_i W_i + (du [A_1; ...; A_k]) * m / (1 - p)
All products run in the model dtype on tensor cores; A and B stay float32 parameters (cast per call,
they are tiny) and their gradients are accumulated in float32. Saved: D(x), the dropout mask (1 byte
an element) and u -- not x in float32, not per-projection dropped copies, not y.

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
from .dropout import seeded_dropout, seeded_dropout_backward_add

__all__ = ["LoraProj", "lora_group", "lora_group_reference"]


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


class _LoraGroupFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor | None, p: float, scalings: tuple[float, ...],
                seed: torch.Tensor | None, site: int, *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        k = len(scalings)
        weights, biases, a_s, b_s = params[:k], params[k:2 * k], params[2 * k:3 * k], params[3 * k:]
        lead, dt = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        if p > 0 and seed is not None:  # mask from (seed, site): nothing to save, same on recomputation
            x2 = x2.contiguous()
            xd, mask = seeded_dropout(x2, seed, site, p), None
        elif p > 0 and mask is None:
            xd, mask = torch.native_dropout(x2, p, True)
        elif p > 0:
            mask = mask.reshape(x2.shape)
            xd = x2 * mask * (1.0 / (1.0 - p))
        else:
            xd, mask = x2, None
        a_cat = torch.cat(a_s).to(dt)
        u = xd @ a_cat.t()
        ranks = [a.shape[0] for a in a_s]
        outs, b_scaled, off = [], [], 0
        for w, bias, b, s, r in zip(weights, biases, b_s, scalings, ranks):
            y = F.linear(x2, w, bias)
            bs = (b * s).to(dt)
            y.addmm_(u[:, off:off + r], bs.t())
            outs.append(y.view(*lead, y.shape[-1]))
            b_scaled.append(bs)
            off += r
        ctx.save_for_backward(xd, mask, u, a_cat, seed if p > 0 else None, *weights, *b_scaled)
        ctx.meta = (k, p, scalings, ranks, x.shape, [a.dtype for a in a_s], [b.dtype for b in b_s], site)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor | None):
        k, p, scalings, ranks, x_shape, a_dtypes, b_dtypes, site = ctx.meta
        xd, mask, u, a_cat, seed, *rest = ctx.saved_tensors
        weights, b_scaled = rest[:k], rest[k:]
        n = xd.shape[0]
        need_x = ctx.needs_input_grad[0]
        dx, du_parts, d_b, off = None, [], [], 0
        for i, (dy, r) in enumerate(zip(dys, ranks)):
            if dy is None:
                du_parts.append(u.new_zeros((n, r)))
                d_b.append(torch.zeros_like(b_scaled[i], dtype=b_dtypes[i]))
                off += r
                continue
            dy = dy.reshape(n, dy.shape[-1])
            if need_x:
                dx = dy @ weights[i] if dx is None else dx.addmm_(dy, weights[i])
            du_parts.append(dy @ b_scaled[i])
            d_b.append((_mm_f32(dy.t(), u[:, off:off + r]) * scalings[i]).to(b_dtypes[i]))
            off += r
        du = torch.cat(du_parts, dim=1)
        d_a_cat = _mm_f32(du.t(), xd)
        d_a = [g.to(dt) for g, dt in zip(d_a_cat.split(ranks), a_dtypes)]
        if need_x:
            if dx is None:
                dx = torch.zeros((n, x_shape[-1]), dtype=xd.dtype, device=xd.device)
            if seed is not None:
                seeded_dropout_backward_add(dx, du @ a_cat, seed, site, p)
            elif mask is None:
                dx.addmm_(du, a_cat)
            else:
                dx.addcmul_(du @ a_cat, mask, value=1.0 / (1.0 - p))
            dx = dx.view(x_shape)
        return (dx, None, None, None, None, None, *([None] * (2 * k)), *d_a, *d_b)


def lora_group(x: torch.Tensor, projs: Sequence[LoraProj], dropout: float = 0.0, training: bool = True,
               mask: torch.Tensor | None = None,
               seed: tuple[torch.Tensor, int] | None = None) -> list[torch.Tensor]:
    """y_i = x W_i^T + b_i + s_i D(x) A_i^T B_i^T for every projection, sharing x and one dropout mask.

    Projections without an adapter are plain frozen linears. `mask` (bool, shape of x) replaces the
    random draw, for tests. `seed` = (DropoutSeed.value, call site) draws the mask with the seeded
    Triton dropout instead (see lorafit.kernels.dropout; ignored where Triton cannot run). Works on
    any device and dtype; on GPU every product hits tensor cores.
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
        ys = _LoraGroupFn.apply(x, mask if p > 0 else None, p, tuple(float(pr.scaling) for pr in group),
                                seed_t, site, *[pr.weight for pr in group], *[pr.bias for pr in group],
                                *[pr.lora_A for pr in group], *[pr.lora_B for pr in group])
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
