"""Where Triton kernels may run: Triton importable and the tensor on a CUDA device.

Every public function in `lorafit.kernels` asks `use_triton(tensor)` and otherwise takes its plain
PyTorch reference, so the same code runs on a CPU-only install. Tests set ``TRITON_INTERPRET=1`` to
run the kernels on CPU tensors through Triton's interpreter; ``LORAFIT_NO_TRITON=1`` forces the
references everywhere (for A/B measurements).
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU installs have none and never need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = ["triton", "tl", "use_triton", "num_warps_for"]


def use_triton(t: torch.Tensor) -> bool:
    """True when a Triton kernel can take tensor ``t`` (CUDA, or CPU under the interpreter)."""
    if triton is None or os.environ.get("LORAFIT_NO_TRITON") == "1":
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def num_warps_for(block: int) -> int:
    """Warps for a one-row-per-program kernel: enough threads to cover the row in a few passes."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4
