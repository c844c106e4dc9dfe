"""Fused RMSNorm: one read of the row forward, one read of (row, grad) backward.

Forward, per row x of width N (computed in float32):
    r = 1 / sqrt(mean(x^2) + eps),   x_hat = x * r,   y = w * round(x_hat)
where round() casts to the input dtype first, as Hugging Face's Llama/Qwen2 RMSNorm does.

Backward, with g = dy * w:
    dx = r * (g - x_hat * mean(g * x_hat))
(from dr/dx_j = -r^3 x_j / N). The weight is frozen under LoRA, so no dw is computed; a trainable
weight takes the reference path. Saved for backward: x and r (N + 1 numbers per row) -- HF's eager
norm keeps several float32 copies of the row instead.

`add_rms_norm` folds the residual add in front of the norm (the decoder's post-attention step):
    h = residual + x   (rounded to the input dtype, as the eager add),   y = rmsnorm(h)
and returns (y, h). Backward, with dh the gradient that reaches h through the later residual path:
    dx = d_residual = r * (g - h_hat * mean(g * h_hat)) + dh
One kernel each way instead of an add, a norm, and autograd's add of the two gradients of h.
"""
from __future__ import annotations

import torch

from ._triton import num_warps_for, tl, triton, use_triton

__all__ = ["add_rms_norm", "add_rms_norm_reference", "rms_norm", "rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm.forward, verbatim in maths and rounding."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        x_hat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (x_hat * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, stride_dy, stride_x, stride_dx, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        g = dy * w
        c = tl.sum(g * x_hat, axis=0) / N
        tl.store(DX + row * stride_dx + cols, ((g - x_hat * c) * rstd).to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rms_norm_fwd_kernel(X, R, W, H, Y, RSTD, stride_x, stride_r, stride_h, stride_y, N, eps,
                                 BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (r + x).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        h_hat = (hf * rstd).to(H.dtype.element_ty).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (h_hat * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _add_rms_norm_bwd_kernel(DY, H, W, RSTD, DH, DX, stride_dy, stride_h, stride_dh, stride_dx, N,
                                 HAS_DH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        h_hat = h * rstd
        g = dy * w
        c = tl.sum(g * h_hat, axis=0) / N
        dx = (g - h_hat * c) * rstd
        if HAS_DH:
            dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        n, width = x2.shape
        y = torch.empty((n, width), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(width)
        _rms_norm_fwd_kernel[(n,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), width, eps,
                                   BLOCK=block, num_warps=num_warps_for(block))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(*x.shape[:-1], width)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        n, width = x2.shape
        dx = torch.empty_like(x2)
        block = triton.next_power_of_2(width)
        _rms_norm_bwd_kernel[(n,)](dy2, x2, weight, rstd, dx, dy2.stride(0), x2.stride(0), dx.stride(0), width,
                                   BLOCK=block, num_warps=num_warps_for(block))
        return dx.view(dy.shape), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: the Triton kernel on GPU, else (or for a trainable weight) the reference."""
    if use_triton(x) and not weight.requires_grad:
        return _RMSNormFn.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's `h = residual + x; y = norm(h)` in eager ops; returns (y, h)."""
    h = residual + x
    return rms_norm_reference(h, weight, eps), h


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        x2, r2 = _rows(x), _rows(residual)
        n, width = x2.shape
        h = torch.empty((n, width), dtype=x.dtype, device=x.device)
        y = torch.empty((n, width), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(width)
        _add_rms_norm_fwd_kernel[(n,)](x2, r2, weight, h, y, rstd, x2.stride(0), r2.stride(0), h.stride(0),
                                       y.stride(0), width, eps, BLOCK=block, num_warps=num_warps_for(block))
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dh: torch.Tensor | None):
        h, weight, rstd = ctx.saved_tensors
        n, width = h.shape
        dy2 = torch.zeros_like(h) if dy is None else _rows(dy)
        dh2 = None if dh is None else _rows(dh)
        dx = torch.empty_like(h)
        block = triton.next_power_of_2(width)
        _add_rms_norm_bwd_kernel[(n,)](dy2, h, weight, rstd, dy2 if dh2 is None else dh2, dx, dy2.stride(0),
                                       h.stride(0), dy2.stride(0) if dh2 is None else dh2.stride(0), dx.stride(0),
                                       width, HAS_DH=dh2 is not None, BLOCK=block, num_warps=num_warps_for(block))
        dx = dx.view(ctx.shape)
        return dx, dx, None, None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(residual + x), residual + x): one Triton kernel on GPU, else the reference."""
    if (use_triton(x) and not weight.requires_grad and x.dtype == residual.dtype
            and x.shape == residual.shape):
        return _AddRMSNormFn.apply(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)
