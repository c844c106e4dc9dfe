"""Fused SwiGLU: a = silu(g) * u in one pass, its gradient in one pass.

Forward (float32 inside, one rounding at the end):
    s = sigmoid(g),   a = g * s * u
Backward:
    du = da * g * s
    dg = da * u * s * (1 + g * (1 - s))        (d silu / dg = s + g s (1 - s))
Saved for backward: g and u only. Eager PyTorch runs two kernels forward and about five backward over
tensors of width `intermediate_size` (14336 for Llama-3-8B), and keeps silu(g) as well.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton, use_triton

__all__ = ["swiglu", "swiglu_reference"]

_BLOCK = 1024


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """What Llama's MLP computes between its projections: act_fn(gate) * up, act_fn = silu."""
    return F.silu(g) * u


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, A, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        a = g * tl.sigmoid(g) * u
        tl.store(A + offs, a.to(A.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DA, G, U, DG, DU, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        da = tl.load(DA + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(DU + offs, (da * g * s).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (da * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        g, u = g.contiguous(), u.contiguous()
        a = torch.empty_like(g)
        n = g.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](g, u, a, n, BLOCK=_BLOCK, num_warps=4)
        ctx.save_for_backward(g, u)
        return a

    @staticmethod
    def backward(ctx, da: torch.Tensor):
        g, u = ctx.saved_tensors
        da = da.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](da, g, u, dg, du, n, BLOCK=_BLOCK, num_warps=4)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u: the Triton kernel on GPU, the reference elsewhere."""
    if use_triton(g) and g.shape == u.shape and g.dtype == u.dtype:
        return _SwiGLUFn.apply(g, u)
    return swiglu_reference(g, u)
