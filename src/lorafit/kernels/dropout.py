"""Seeded dropout: the mask is a pure function of (step seed, call site, element), never of RNG state.

    keep_i = philox(seed * 2^20 + site, i) >= p,     y_i = x_i * keep_i / (1 - p)
Backward, added straight into the input gradient with the mask drawn again:
    dx_i += g_i * keep_i / (1 - p)
Why: activation checkpointing recomputes a layer's forward during backward and needs the same masks.
torch.utils.checkpoint gets them by saving and restoring the CUDA RNG state, which cannot be read while
a CUDA graph is being captured. A mask that depends only on a device-side step counter (`DropoutSeed`,
advanced once per forward inside the graph) and a fixed call-site number is the same in the forward
and its recomputation without touching RNG state -- so checkpointing runs with
preserve_rng_state=False and the whole step can be captured. It also saves no mask (the eager
path keeps a 1-byte mask per element). Triton only; the reference is torch's dropout with a given mask.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton

__all__ = ["DropoutSeed", "seeded_dropout", "seeded_dropout_backward_add", "seeded_keep_mask"]

_BLOCK = 1024


class DropoutSeed:
    """A device-side step counter; `advance()` (in place, graph-capturable) before each forward."""

    def __init__(self, device: torch.device | str, start: int = 0) -> None:
        self.value = torch.full((), start, dtype=torch.int64, device=device)

    def advance(self) -> None:
        self.value.add_(1)


if triton is not None:

    @triton.jit
    def _keep(SEED, site, offs, p):
        seed = tl.load(SEED) * 1048576 + site
        return tl.rand(seed, offs) >= p

    @triton.jit
    def _dropout_fwd_kernel(X, Y, SEED, site, n, p, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(_keep(SEED, site, offs, p), x * scale, 0.0)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _dropout_bwd_add_kernel(DX, G, SEED, site, n, p, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        dx = tl.load(DX + offs, mask=mask, other=0.0).to(tl.float32)
        dx += tl.where(_keep(SEED, site, offs, p), g * scale, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def seeded_dropout(x: torch.Tensor, seed: torch.Tensor, site: int, p: float) -> torch.Tensor:
    """Dropout of contiguous x with the (seed, site) mask (elements indexed in memory order)."""
    y = torch.empty_like(x)
    n = x.numel()
    _dropout_fwd_kernel[(triton.cdiv(n, _BLOCK),)](x, y, seed, site, n, p, 1.0 / (1.0 - p), BLOCK=_BLOCK)
    return y


def seeded_dropout_backward_add(dx: torch.Tensor, g: torch.Tensor, seed: torch.Tensor, site: int, p: float) -> None:
    """dx += dropout'(g): the same mask as `seeded_dropout(., seed, site, p)`, in place."""
    n = dx.numel()
    _dropout_bwd_add_kernel[(triton.cdiv(n, _BLOCK),)](dx, g, seed, site, n, p, 1.0 / (1.0 - p), BLOCK=_BLOCK)


def seeded_keep_mask(shape: torch.Size | tuple[int, ...], seed: torch.Tensor, site: int, p: float,
                     device: torch.device) -> torch.Tensor:
    """The boolean keep-mask itself (for tests: feed it to the reference path)."""
    ones = torch.ones(shape, dtype=torch.float32, device=device)
    return seeded_dropout(ones, seed, site, p) != 0
