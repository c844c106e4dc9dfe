"""The SwiGLU kernel (`kernels/swiglu.py`) against its reference."""
from __future__ import annotations

import pytest
import torch

from lorafit.kernels import swiglu, swiglu_reference

from .helpers import TOL, as64, fwd_bwd, leaf, needs_triton, rel


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel(dtype: torch.dtype) -> None:
    g, u = leaf(4, 1500, dtype=dtype), leaf(4, 1500, dtype=dtype)
    out, grads = fwd_bwd(swiglu, g, u)
    ref, refs = fwd_bwd(swiglu_reference, *as64(g, u))
    assert rel(out, ref) < TOL[dtype]
    assert all(rel(a, b) < TOL[dtype] for a, b in zip(grads, refs))
