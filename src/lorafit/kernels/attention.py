"""Causal attention over packed sequences (variable length), without a dense mask.

Packed rows hold several examples back to back; `cu_seqlens` ([0, l_1, l_1 + l_2, ..., T]) marks where
each starts. Each token attends causally within its own example only:
    o_t = softmax(q_t K_S^T * scale + causal) V_S,   S = the example holding token t.
On CUDA this calls FlashAttention-2's varlen kernel that ships inside PyTorch
(`aten._flash_attention_forward` with cumulative lengths; its backward is PyTorch's registered
derivative), so the cost is sum(l_i^2), not T^2, and nothing of size T x T is built. Hugging Face's SDPA
path for packed position_ids instead builds a (T x T) block-diagonal mask, which rules out the flash
and cuDNN kernels. The reference runs SDPA once per example.

`causal_attention` is the unpacked case (rows of equal length, no mask) with a chosen SDPA backend:
PyTorch's dispatcher picks one kernel for the baseline and for us alike; pinning cuDNN or flash lets the
two be measured. cuDNN gets k and v expanded to every query head (what Hugging Face's repeat_kv does),
since its grouped-query support depends on the PyTorch and cuDNN versions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SDPA_BACKENDS", "causal_attention", "varlen_attention", "varlen_attention_reference"]

SDPA_BACKENDS = ("cudnn", "cudnn-gqa", "flash", "efficient", "math")


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


def _expand_kv(t: torch.Tensor, rep: int) -> torch.Tensor:
    """(b, Hk, s, d) -> (b, Hk * rep, s, d), each key/value head repeated for its query heads."""
    if rep == 1:
        return t
    b, hk, s, d = t.shape
    return t[:, :, None].expand(b, hk, rep, s, d).reshape(b, hk * rep, s, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     backend: str | None = None) -> torch.Tensor:
    """Causal SDPA of q (b, H, s, d) over k/v (b, Hk, s, d) -> (b, s, H, d), as Hugging Face's sdpa path.

    backend: None lets PyTorch choose; "cudnn", "flash", "efficient" or "math" pins that kernel on CUDA
    (an error if it cannot take the inputs); "cudnn-gqa" is cuDNN without expanding k/v (where its
    grouped-query support exists). On CPU the backend is ignored.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend is not None and backend not in SDPA_BACKENDS:
        raise ValueError(f"sdpa backend {backend!r}: expected one of {SDPA_BACKENDS}")
    rep = q.shape[1] // k.shape[1]
    if backend == "cudnn" or (rep > 1 and not q.is_cuda):
        k, v, rep = _expand_kv(k, rep), _expand_kv(v, rep), 1
    extra = {"enable_gqa": True} if rep > 1 else {}
    if backend is None or not q.is_cuda:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **extra)
    else:
        pinned = {"cudnn": SDPBackend.CUDNN_ATTENTION, "cudnn-gqa": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                  "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
        with sdpa_kernel([pinned]):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **extra)
    return o.transpose(1, 2)
