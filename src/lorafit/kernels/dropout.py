"""Seeded dropout: the mask is a pure function of (step seed, call site, element), never of RNG state.

    keep_i = hash(seed * 2^20 + site, i) >= p,     y_i = x_i * keep_i / (1 - p)
Why: activation checkpointing recomputes a layer's forward during backward and needs the same masks.
torch.utils.checkpoint gets them by saving and restoring the CUDA RNG state, which cannot be read while
a CUDA graph is being captured. A mask that depends only on a device-side step counter (`DropoutSeed`,
advanced once per forward inside the graph) and a fixed call-site number is the same in the forward
and its recomputation without touching RNG state -- so checkpointing runs with
preserve_rng_state=False and the whole step can be captured. It also saves no mask (the eager
path keeps a 1-byte mask per element). Triton only; the reference is torch's dropout with a given mask.

Because the mask can be drawn anywhere, the LoRA products never need the dropped input in memory:
    dropout_matmul:    u  = D(x) A^T          (forward: x read once, no D(x) written)
    dropout_matmul_t:  dA = g^T D(x)          (backward: the same mask drawn again from x)
    matmul_dropout:    dx = D'(g A)           (backward: the input gradient, written once)
The hash is murmur3's 32-bit finaliser of (element index, key): three multiplies and a few shifts an
element, where Philox (tl.rand) runs ten rounds; dropout needs independent uniform-looking bits, not a
stream cipher. The element index is 32-bit, so one input holds fewer than 2^31 elements.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton

__all__ = ["DropoutSeed", "dropout_matmul", "dropout_matmul_t", "matmul_dropout", "seeded_dropout",
           "seeded_keep_mask"]

_BLOCK = 1024


class DropoutSeed:
    """A device-side step counter; `advance()` (in place, graph-capturable) before each forward."""

    def __init__(self, device: torch.device | str, start: int = 0) -> None:
        self.value = torch.full((), start, dtype=torch.int64, device=device)

    def advance(self) -> None:
        self.value.add_(1)


if triton is not None:

    @triton.jit
    def _fmix32(h):
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        return h ^ (h >> 16)

    @triton.jit
    def _seed_key(SEED, site):
        s = tl.load(SEED) * 1048576 + site
        return _fmix32((s & 0xFFFFFFFF).to(tl.uint32) ^ _fmix32((s >> 32).to(tl.uint32) + 0x9E3779B9))

    @triton.jit
    def _keep_k(key, offs, p):
        h = _fmix32(offs.to(tl.uint32) * 0x9E3779B1 + key)
        return (h >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p

    @triton.jit
    def _keep(SEED, site, offs, p):
        return _keep_k(_seed_key(SEED, site), offs, p)

    @triton.jit
    def _dropout_fwd_kernel(X, Y, SEED, site, n, p, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(_keep(SEED, site, offs, p), x * scale, 0.0)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _dropout_mm_kernel(X, A, U, SEED, site, n, K, R, k_split, p, scale,
                           BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):
        # U[split] = D(X)[rows, k-range] @ A[:, k-range]^T, float32 partial sums
        pid_m, pid_s = tl.program_id(0), tl.program_id(1)
        key = _seed_key(SEED, site)
        rows = pid_m * BM + tl.arange(0, BM)
        rr = tl.arange(0, RP)
        acc = tl.zeros((BM, RP), dtype=tl.float32)
        k_end = tl.minimum(pid_s * k_split + k_split, K)
        for k0 in range(pid_s * k_split, k_end, BK):
            ks = k0 + tl.arange(0, BK)
            offs = rows[:, None] * K + ks[None, :]
            x = tl.load(X + offs, mask=(rows[:, None] < n) & (ks[None, :] < k_end), other=0.0)
            x = tl.where(_keep_k(key, offs, p), x, tl.zeros_like(x))
            a = tl.load(A + rr[None, :] * K + ks[:, None], mask=(rr[None, :] < R) & (ks[:, None] < k_end), other=0.0)
            acc += tl.dot(x, a)
        out = U + pid_s * n * RP + rows[:, None] * RP + rr[None, :]
        tl.store(out, acc * scale, mask=rows[:, None] < n)

    @triton.jit
    def _dropout_mm_t_kernel(G, X, DA, SEED, site, n, K, R, n_split, p, scale,
                             BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr):
        # DA[split] = G[row-range]^T @ D(X)[row-range, cols], float32 partial sums
        pid_k, pid_s = tl.program_id(0), tl.program_id(1)
        key = _seed_key(SEED, site)
        cols = pid_k * BN + tl.arange(0, BN)
        rr = tl.arange(0, RP)
        acc = tl.zeros((RP, BN), dtype=tl.float32)
        m_end = tl.minimum(pid_s * n_split + n_split, n)
        for m0 in range(pid_s * n_split, m_end, BM):
            rows = m0 + tl.arange(0, BM)
            offs = rows[:, None] * K + cols[None, :]
            x = tl.load(X + offs, mask=(rows[:, None] < m_end) & (cols[None, :] < K), other=0.0)
            x = tl.where(_keep_k(key, offs, p), x, tl.zeros_like(x))
            g = tl.load(G + rows[None, :] * R + rr[:, None], mask=(rr[:, None] < R) & (rows[None, :] < m_end),
                        other=0.0)
            acc += tl.dot(g, x)
        out = DA + pid_s * RP * K + rr[:, None] * K + cols[None, :]
        tl.store(out, acc * scale, mask=cols[None, :] < K)

    @triton.jit
    def _mm_dropout_kernel(G, A, DX, SEED, site, n, K, R, p, scale,
                           BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr):
        # DX = D'(G @ A): the dropout's input gradient, written once
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        key = _seed_key(SEED, site)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_k * BN + tl.arange(0, BN)
        rr = tl.arange(0, RP)
        g = tl.load(G + rows[:, None] * R + rr[None, :], mask=(rows[:, None] < n) & (rr[None, :] < R), other=0.0)
        a = tl.load(A + rr[:, None] * K + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < K), other=0.0)
        offs = rows[:, None] * K + cols[None, :]
        y = tl.dot(g, a) * scale
        y = tl.where(_keep_k(key, offs, p), y, 0.0)
        tl.store(DX + offs, y.to(DX.dtype.element_ty), mask=(rows[:, None] < n) & (cols[None, :] < K))

    @triton.jit
    def _sum_splits_kernel(P, OUT, split, rows, cols, p_cols, BLOCK: tl.constexpr):
        # OUT[i, j] = sum_s P[s, i, j] (P is (split, rows, p_cols), j < cols), cast to OUT's dtype
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < rows * cols
        src = (offs // cols) * p_cols + offs % cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(split):
            acc += tl.load(P + i * rows * p_cols + src, mask=inside, other=0.0)
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=inside)


def seeded_dropout(x: torch.Tensor, seed: torch.Tensor, site: int, p: float) -> torch.Tensor:
    """Dropout of contiguous x with the (seed, site) mask (elements indexed in memory order)."""
    y = torch.empty_like(x)
    n = x.numel()
    _dropout_fwd_kernel[(triton.cdiv(n, _BLOCK),)](x, y, seed, site, n, p, 1.0 / (1.0 - p), BLOCK=_BLOCK)
    return y


def seeded_keep_mask(shape: torch.Size | tuple[int, ...], seed: torch.Tensor, site: int, p: float,
                     device: torch.device) -> torch.Tensor:
    """The boolean keep-mask itself (for tests: feed it to the reference path)."""
    ones = torch.ones(shape, dtype=torch.float32, device=device)
    return seeded_dropout(ones, seed, site, p) != 0


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _sum_splits(part: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """part (split, rows, >= cols) summed over splits, first `cols` columns, as `dtype`: one kernel."""
    split, rows, p_cols = part.shape
    out = torch.empty((rows, cols), dtype=dtype, device=part.device)
    _sum_splits_kernel[(triton.cdiv(rows * cols, 1024),)](part, out, split, rows, cols, p_cols, BLOCK=1024)
    return out


# Tile sizes measured on an H100 at Llama-3-8B sizes (benchmarks/micro_dropout_mm.py); `programs` is how many
# programs a split reduction aims for (4 per SM of an H100's 132).
FWD_CONFIG = dict(bm=32, bk=128, warps=4, stages=3, programs=528)
GRAD_A_CONFIG = dict(bm=32, bn=128, warps=4, stages=3, programs=528)
GRAD_X_CONFIG = dict(bm=64, bn=128, warps=4, stages=3)


def _split(blocks: int, length: int, step: int, programs: int) -> tuple[int, int]:
    """(splits, elements per split, a multiple of step) of a reduction of `length`."""
    want = max(1, min(length // step, -(-programs // blocks)))
    per = triton.cdiv(triton.cdiv(length, want), step) * step
    return triton.cdiv(length, per), per


def dropout_matmul(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, site: int, p: float,
                   config: dict | None = None, alpha: float = 1.0) -> torch.Tensor:
    """alpha D(x) @ a^T for contiguous x (n, K) and a (R, K), with the (seed, site) mask of `seeded_dropout`;
    float32 accumulation, returned in x's dtype. D(x) is never written."""
    c = {**FWD_CONFIG, **(config or {})}
    n, k = x.shape
    if n * k >= 2 ** 31:  # element offsets (the hash's input) are 32-bit
        raise ValueError(f"seeded dropout takes inputs of fewer than 2^31 elements; got {n} x {k}: "
                         "use smaller micro-batches")
    r = a.shape[0]
    rp = _rank_pad(r)
    blocks = triton.cdiv(n, c["bm"])
    split, per = _split(blocks, k, c["bk"], c["programs"])
    part = torch.empty((split, n, rp), dtype=torch.float32, device=x.device)
    _dropout_mm_kernel[(blocks, split)](x, a.contiguous(), part, seed, site, n, k, r, per, p, alpha / (1.0 - p),
                                        BM=c["bm"], BK=c["bk"], RP=rp, num_warps=c["warps"], num_stages=c["stages"])
    return _sum_splits(part, r, x.dtype)


def dropout_matmul_t(g: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, site: int, p: float,
                     config: dict | None = None, alpha: float = 1.0) -> torch.Tensor:
    """alpha g^T @ D(x) in float32 for g (n, R) and contiguous x (n, K): the gradient of A in D(x) A^T."""
    c = {**GRAD_A_CONFIG, **(config or {})}
    n, k = x.shape
    r = g.shape[1]
    rp = _rank_pad(r)
    blocks = triton.cdiv(k, c["bn"])
    split, per = _split(blocks, n, c["bm"], c["programs"])
    part = torch.empty((split, rp, k), dtype=torch.float32, device=x.device)
    _dropout_mm_t_kernel[(blocks, split)](g.contiguous(), x, part, seed, site, n, k, r, per, p, alpha / (1.0 - p),
                                          BM=c["bm"], BN=c["bn"], RP=rp, num_warps=c["warps"], num_stages=c["stages"])
    return part[0, :r] if split == 1 else _sum_splits(part, k, torch.float32)[:r]


def matmul_dropout(g: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, site: int, p: float,
                   config: dict | None = None, alpha: float = 1.0) -> torch.Tensor:
    """alpha D'(g @ a) for g (n, R) and a (R, K): the gradient reaching x through D(x) A^T, in g's dtype."""
    c = {**GRAD_X_CONFIG, **(config or {})}
    n, r = g.shape
    k = a.shape[1]
    out = torch.empty((n, k), dtype=g.dtype, device=g.device)
    _mm_dropout_kernel[(triton.cdiv(n, c["bm"]), triton.cdiv(k, c["bn"]))](
        g.contiguous(), a.contiguous(), out, seed, site, n, k, r, p, alpha / (1.0 - p),
        BM=c["bm"], BN=c["bn"], RP=_rank_pad(r), num_warps=c["warps"], num_stages=c["stages"])
    return out
