"""The rotary-embedding kernel (`kernels/rotary.py`) against HF's `apply_rotary_pos_emb`."""
from __future__ import annotations

import pytest
import torch

from lorafit.kernels import rope, rope_reference

from .helpers import DEV, TOL, as64, fwd_bwd, leaf, needs_triton, rel


def test_rope_reference_is_hf() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 2, 16)
    cos, sin = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.allclose(hq.transpose(1, 2), rope_reference(q, cos, sin))
    assert torch.allclose(hk.transpose(1, 2), rope_reference(k, cos, sin))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel(dtype: torch.dtype) -> None:
    x = leaf(2, 7, 3, 16, dtype=dtype)
    emb = torch.arange(7, device=DEV)[:, None] * torch.rand(8, device=DEV)
    cos, sin = torch.cat([emb, emb], -1).cos()[None].to(dtype), torch.cat([emb, emb], -1).sin()[None].to(dtype)
    out, (dx,) = fwd_bwd(lambda t: rope(t, cos, sin), x)
    ref, (dx64,) = fwd_bwd(lambda t: rope_reference(t, cos.double(), sin.double()), *as64(x))
    assert rel(out, ref) < TOL[dtype] and rel(dx, dx64) < TOL[dtype]
