"""Fused rotary position embedding: one pass over q (or k) per direction, all heads of a token at once.

With x = [x1, x2] split in halves of the head dim and cos = [c1, c2], sin = [s1, s2] as Hugging Face
builds them (any rope type: the scaling lives in cos/sin), the forward is
    y1 = x1 * c1 - x2 * s1,      y2 = x2 * c2 + x1 * s2        (= x * cos + rotate_half(x) * sin)
and, being linear in x, its backward is the transposed map
    dx1 = dy1 * c1 + dy2 * s2,   dx2 = dy2 * c2 - dy1 * s1.
Nothing but cos/sin (shared by every layer) is saved. Eager HF runs about six kernels per tensor
(two multiplies, slice, negate, concatenate, add) in each direction.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton, use_triton

__all__ = ["rope", "rope_qk", "rope_reference"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb for one tensor laid out (batch, seq, heads, head_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


if triton is not None:

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, stride_xt, stride_xh, stride_yt, stride_yh, stride_cb, stride_cs, S, H, D_HALF,
                     BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        dmask = d < D_HALF
        mask = (h < H) & dmask
        row = (t // S) * stride_cb + (t % S) * stride_cs  # cos/sin may broadcast over the batch
        c1 = tl.load(COS + row + d, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + row + D_HALF + d, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + row + d, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + row + D_HALF + d, mask=dmask, other=0.0).to(tl.float32)
        xp = X + t * stride_xt + h * stride_xh + d
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + D_HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        yp = Y + t * stride_yt + h * stride_yh + d
        tl.store(yp, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(yp + D_HALF, y2.to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    b, s, h, d = x.shape
    x3 = x.reshape(b * s, h, d)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    y = torch.empty((b * s, h, d), dtype=x.dtype, device=x.device)
    stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope_kernel[(b * s,)](x3, cos, sin, y, x3.stride(0), x3.stride(1), y.stride(0), y.stride(1), stride_cb,
                           cos.stride(1), s, h, d // 2, BACKWARD=backward, BLOCK_H=triton.next_power_of_2(h),
                           BLOCK_D=triton.next_power_of_2(d // 2), num_warps=4)
    return y.view(b, s, h, d)


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, backward=True), None, None


def _ok(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Kernel layout: even head_dim, cos/sin (1 or batch, seq, head_dim) with unit last stride, alike."""
    return (use_triton(x) and x.shape[-1] % 2 == 0 and cos.dim() == 3 and cos.stride(-1) == 1
            and cos.shape[0] in (1, x.shape[0]) and cos.stride() == sin.stride())


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by cos/sin (batch or 1, seq, head_dim)."""
    if not _ok(x, cos, sin):
        return rope_reference(x, cos, sin)
    return _RopeFn.apply(x, cos, sin)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k alike (the attention module's call)."""
    return rope(q, cos, sin), rope(k, cos, sin)
