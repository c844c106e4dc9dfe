"""Fused linear cross-entropy: the causal-LM loss without full float32 logits over the vocabulary.

For hidden rows h (n x H), the output head W (V x H) and next-token targets t, the loss is
    L = (1/m) sum_i [lse(z_i) - z_i[t_i]],   z_i = W h_i,   m = number of targets that are not ignored
and its gradient
    dz_i = (softmax(z_i) - onehot(t_i)) / m,   dh_i = W^T dz_i,   dW = sum_i dz_i h_i^T (only if W trains).
Rows are taken `chunk` at a time: each chunk's logits are made in the model dtype, a kernel turns them
into dz in place (one online max/sum pass, one write pass), and dz @ W gives that chunk's dh during the
forward, so backward only scales the saved dh by the incoming gradient. Peak extra memory is one chunk
of logits (chunk x V), against n x V logits plus their float32 copy and its gradient in HF's loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton, use_triton

__all__ = ["fused_causal_lm_loss", "causal_lm_loss_reference", "shift_labels"]

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets for each position: the next token's label, and `ignore_index` after the last (as HF)."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def causal_lm_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """HF's path: full logits, upcast to float32, cross-entropy over shifted labels."""
    logits = F.linear(hidden, weight).float()
    target = shift_labels(labels).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch


if triton is not None:

    @triton.jit
    def _ce_grad_kernel(Z, stride_z, T, LOSS, SCALE, ignore_index, V: tl.constexpr, BLOCK: tl.constexpr):
        """One row: loss = lse - z[t]; z <- (softmax(z) - onehot(t)) * scale, in place."""
        row = tl.program_id(0).to(tl.int64)
        zp = Z + row * stride_z
        target = tl.load(T + row)
        valid = target != ignore_index
        scale = tl.load(SCALE)
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(zp + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        safe_t = tl.where(valid, target, 0)
        z_t = tl.load(zp + safe_t).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, lse - z_t, 0.0))
        row_scale = tl.where(valid, scale, 0.0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            z = tl.load(zp + cols, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - tl.where(cols == safe_t, 1.0, 0.0)) * row_scale
            tl.store(zp + cols, g.to(Z.dtype.element_ty), mask=mask)


def _ce_grad_triton(z: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    _ce_grad_kernel[(z.shape[0],)](z, z.stride(0), target, loss, scale, IGNORE_INDEX, V=z.shape[1],
                                   BLOCK=4096, num_warps=8)
    return loss


def _ce_grad_torch(z: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same contract as the kernel, in float32 torch ops (CPU path)."""
    zf = z.float()
    lse = torch.logsumexp(zf, dim=-1)
    valid = target != IGNORE_INDEX
    safe = torch.where(valid, target, 0)
    loss = torch.where(valid, lse - zf.gather(1, safe[:, None]).squeeze(1), 0.0)
    g = torch.exp(zf - lse[:, None])
    g.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
    g *= torch.where(valid, scale, 0.0)[:, None]
    z.copy_(g)
    return loss


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, denom: torch.Tensor,
                chunk: int) -> torch.Tensor:
        scale = (1.0 / denom.float()).reshape(1)
        grad_rows = _ce_grad_triton if use_triton(hidden) else _ce_grad_torch
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            z = h @ weight.t()
            total += grad_rows(z, target[start:start + chunk], scale).sum()
            if dh is not None:
                torch.mm(z, weight, out=dh[start:start + chunk])
            if dw is not None:
                dw += (z.t() @ h).float()
        ctx.save_for_backward(dh, dw)
        return total * scale[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad.to(dh.dtype)
        dw = None if dw is None else dw * grad
        return dh, dw, None, None, None


def fused_causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int | None = None,
                         num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ lm_head_weight.T` against `labels` (HF's shift rule).

    hidden: (batch, seq, H) final hidden states; labels: (batch, seq) with -100 where no loss is taken.
    chunk: rows of logits made at once (default: about 256 MiB of logits). With `num_items_in_batch`
    the sum is divided by it instead of by the number of targets (gradient accumulation, as HF).
    """
    width = hidden.shape[-1]
    h = hidden.reshape(-1, width)
    target = shift_labels(labels).reshape(-1).to(device=h.device)
    if chunk is None:
        chunk = max(64, (1 << 27) // lm_head_weight.shape[0])
    if num_items_in_batch is None:
        denom = (target != IGNORE_INDEX).sum()
    else:
        denom = torch.as_tensor(num_items_in_batch, device=h.device)
    return _LinearCrossEntropyFn.apply(h, lm_head_weight, target, denom, int(chunk))
