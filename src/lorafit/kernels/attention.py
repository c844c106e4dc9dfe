"""Causal attention over packed sequences (variable length), without a dense mask.

Packed rows hold several examples back to back; `cu_seqlens` ([0, l_1, l_1 + l_2, ..., T]) marks where
each starts. Each token attends causally within its own example only:
    o_t = softmax(q_t K_S^T * scale + causal) V_S,   S = the example holding token t.
On CUDA this calls FlashAttention-2's varlen kernel that ships inside PyTorch
(`aten._flash_attention_forward` with cumulative lengths; its backward is PyTorch's registered
derivative), so the cost is sum(l_i^2), not T^2, and nothing of size T x T is built. Hugging Face's SDPA
path for packed position_ids instead builds a (T x T) block-diagonal mask, which rules out the flash
and cuDNN kernels. The reference runs SDPA once per example.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["varlen_attention", "varlen_attention_reference"]


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """q: (T, H, D), k/v: (T, Hk, D) with H a multiple of Hk -> (T, H, D); one SDPA per example."""
    rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:  # empty slots of a fixed-size cu_seqlens (pack_batch(pad_to_segments=...))
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, dim=0), vs.repeat_interleave(rep, dim=0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, dim=0)


def _flash_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     scale: float) -> torch.Tensor:
    """Causal attention within each packed example; flash varlen on CUDA, per-example SDPA elsewhere."""
    if not _flash_ok(q):
        return varlen_attention_reference(q, k, v, cu_seqlens, scale)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
    return out[0]
