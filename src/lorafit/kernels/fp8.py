"""FP8 copies of the frozen base weights, for the frozen GEMMs of the fused LoRA products
(`quantize_base: fp8`).

Why: at full rows the frozen GEMMs are two thirds of a LoRA step on an 8B model (docs/speed.md), and they
already run at the bf16 ceiling; in e4m3 they take 48 instead of 80 ms a step on an H200 (micro_fp8.py).
Like QLoRA's 4-bit base, the frozen weights are used quantized while the adapter trains; unlike it, the activations are
quantized too (the GEMM itself runs in FP8), so this is a different computation from the bf16 step, not a
faster way to do the same one: the loss it reaches is measured beside bf16's (docs/speed.md).

Scales are per row, the finest that cuBLASLt/CUTLASS FP8 GEMMs take without blocks:
    forward   y  = x W^T     x per token, W per output channel          (copy W,   out x in)
    backward  dx = dy W      dy per token, W per input channel          (copy W^T, in x out)
FP8 GEMMs take only the "TN" layout, so the backward needs its own transposed copy; the two copies hold as
many bytes as the bf16 weight, which is kept for generation, evaluation and merging (in host memory while
one process trains: `Fp8Weights(offload=True)`). The adapters, their rank-r products and every gradient stay
as they are without FP8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import tl, triton, use_triton

__all__ = ["E4M3_MAX", "Fp8Weight", "Fp8Weights", "fp8_matmul", "fp8_supported", "quantize_rows",
           "quantize_rows_reference"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_TINY = 1e-12  # an all-zero row gets this amax: scale > 0, quantized zeros


def fp8_supported(device: torch.device | str) -> str | None:
    """None where FP8 GEMMs run on `device`; else why not (for an error naming `quantize_base`)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"needs a GPU with FP8 tensor cores (compute capability 8.9 or higher: Ada, Hopper, "
                    f"Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}")
    try:  # the product with row-wise scales, as the fused groups call it (on CPU: torch's slow reference)
        a = torch.zeros((16, 16), dtype=E4M3, device=device)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones((16, 1), device=device),
                         scale_b=torch.ones((1, 16), device=device), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as e:
        return (f"needs FP8 matrix products with row-wise scales, which this torch ({torch.__version__}) lacks "
                f"on {device.type}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return None


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / s).to(e4m3) and s, with s = amax(|row|) / 448 per row (float32, shape (rows, 1))."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=_TINY) / E4M3_MAX
    return (x2 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


if triton is not None:
    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * stride_q
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        m = tl.maximum(tl.max(amax, axis=0), 1e-12)
        scale = m / 448.0
        tl.store(s_ptr + row, scale)
        for start in range(0, n_cols, BLOCK):  # the row is read again from L2
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(v / scale, -448.0), 448.0)
            tl.store(q_row + cols, q.to(tl.float8e4nv), mask=cols < n_cols)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n) as e4m3 rows (rows, n) with one float32 scale per row (rows, 1): one pass on GPU."""
    x2 = x.reshape(-1, x.shape[-1])
    if not (x2.is_cuda and use_triton(x2)):  # Triton's CPU interpreter rounds to e4m3 wrongly (2% of elements)
        return quantize_rows_reference(x2)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n = x2.shape
    q = torch.empty((rows, n), dtype=E4M3, device=x2.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x2.device)
    if rows:
        _quantize_rows_kernel[(rows,)](x2, q, scale, n, x2.stride(0), q.stride(0), BLOCK=1024, num_warps=4)
    return q, scale


@dataclass
class Fp8Weight:
    """A frozen weight W (out x in) as FP8: `w` (out x in, per-output-channel scales `w_scale`, 1 x out)
    for the forward GEMM and `wt` (in x out, per-input-channel scales `wt_scale`, 1 x in) for dx."""

    w: torch.Tensor
    w_scale: torch.Tensor
    wt: torch.Tensor
    wt_scale: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Fp8Weight":
        with torch.no_grad():
            w, sw = quantize_rows(weight)
            wt, swt = quantize_rows(weight.t().contiguous())
        return cls(w, sw.view(1, -1), wt, swt.view(1, -1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.w_scale, self.wt, self.wt_scale))


def fp8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale)^T for e4m3 a (m x k) and b (n x k), row scales (m x 1) and (1 x n).

    torch requires k and n to be multiples of 16 (`Fp8Weights.get` keeps other weights out), any m. On CUDA
    the row-wise kernel writes bf16 only: another model dtype gets bf16's rounding, then a cast."""
    out = torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale,
                           out_dtype=torch.bfloat16 if a.is_cuda else out_dtype)
    return out.to(out_dtype)


class Fp8Weights:
    """The FP8 copies of a model's frozen projection weights, made once (the weights never change while
    an adapter trains) and looked up by the fused LoRA products. `nbytes` is what they hold.

    offload: move each copied bf16 weight to host memory as soon as its copies exist (the fused products
    never read it again), so the copies cost no GPU memory; `reload()` puts them back (restore_model does).
    Only for a model nothing else runs while it trains (one process: DDP's wrapper moves the model whole)."""

    def __init__(self, offload: bool = False) -> None:
        self._copies: dict[int, tuple[torch.Tensor, Fp8Weight]] = {}
        self._offload = offload
        self._offloaded: list[tuple[torch.Tensor, torch.device]] = []

    def get(self, weight: torch.Tensor) -> Fp8Weight | None:
        """The copies of `weight`; None for a shape FP8 GEMMs do not take (a side not a multiple of 16),
        which then keeps its model-dtype product."""
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            return None
        entry = self._copies.get(id(weight))
        if entry is None or entry[0] is not weight:
            entry = (weight, Fp8Weight.of(weight))
            self._copies[id(weight)] = entry
            if self._offload and weight.is_cuda:
                self._offloaded.append((weight, weight.device))
                weight.data = weight.data.to("cpu")
        return entry[1]

    def reload(self) -> None:
        """The offloaded weights back on their devices."""
        for weight, device in self._offloaded:
            weight.data = weight.data.to(device)
        self._offloaded.clear()

    @property
    def offloaded_nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w, _ in self._offloaded)

    def __len__(self) -> int:
        return len(self._copies)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes() for _, c in self._copies.values())
