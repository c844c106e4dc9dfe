"""The RMSNorm kernels (`kernels/rmsnorm.py`), plain and with the residual add, against HF's maths."""
from __future__ import annotations

import pytest
import torch

from lorafit.kernels import rms_norm, rms_norm_reference
from lorafit.kernels._triton import use_triton

from .helpers import DEV, TOL, as64, fwd_bwd, leaf, needs_triton, rel


def test_rms_norm_reference_is_hf() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(48, eps=1e-5).to(DEV)
    torch.nn.init.uniform_(hf.weight, 0.5, 1.5)
    x = torch.randn(3, 5, 48, device=DEV)
    assert torch.equal(hf(x), rms_norm_reference(x, hf.weight, 1e-5))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel(dtype: torch.dtype) -> None:
    x, w = leaf(3, 5, 96, dtype=dtype), (torch.rand(96, device=DEV) + 0.5).to(dtype)
    out, (dx,) = fwd_bwd(lambda t: rms_norm(t, w, 1e-5), x)
    x64, = as64(x)
    ref, (dx64,) = fwd_bwd(lambda t: rms_norm_reference(t, w.double(), 1e-5), x64)
    assert rel(out, ref) < TOL[dtype] and rel(dx, dx64) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_kernel(dtype: torch.dtype) -> None:
    from lorafit.kernels import add_rms_norm, add_rms_norm_reference

    x, r = leaf(3, 5, 96, dtype=dtype), leaf(3, 5, 96, dtype=dtype)
    w = (torch.rand(96, device=DEV) + 0.5).to(dtype)

    def both(fn, a, b):  # y and h both reach the loss, as in the decoder (h through the residual)
        y, h = fn(a, b, w if a.dtype == dtype else w.double(), 1e-5)
        return y * 1.5 + h * h

    out, grads = fwd_bwd(lambda a, b: both(add_rms_norm, a, b), x, r)
    ref, refs = fwd_bwd(lambda a, b: both(add_rms_norm_reference, a, b), *as64(x, r))
    assert rel(out, ref) < TOL[dtype]
    assert all(rel(g, gr) < TOL[dtype] for g, gr in zip(grads, refs))


def test_add_rms_norm_reference_is_the_decoder_step() -> None:
    from lorafit.kernels import add_rms_norm, add_rms_norm_reference

    x, r, w = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.rand(16) + 0.5
    y, h = add_rms_norm_reference(x, r, w, 1e-6)
    assert torch.equal(h, r + x) and torch.equal(y, rms_norm_reference(r + x, w, 1e-6))
    if not use_triton(x):  # the public function takes the reference where no kernel can run
        y2, h2 = add_rms_norm(x, r, w, 1e-6)
        assert torch.equal(y2, y) and torch.equal(h2, h)
