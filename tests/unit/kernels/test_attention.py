"""Attention (`kernels/attention.py`): the varlen reference and the pinned-backend SDPA path."""
from __future__ import annotations

import pytest
import torch

from lorafit.kernels import varlen_attention_reference


def test_varlen_reference_equals_block_diagonal_mask() -> None:
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu = torch.tensor([0, 4, 9])
    seg = torch.repeat_interleave(torch.arange(2), torch.tensor([4, 5]))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=allowed, scale=0.3).transpose(0, 1)
    assert torch.allclose(varlen_attention_reference(q, k, v, cu, 0.3), dense, atol=1e-6)


@pytest.mark.parametrize("backend", [None, "cudnn", "flash"])
def test_causal_attention_is_hf_sdpa(backend: str | None) -> None:
    """The pinned-kernel path computes HF's SDPA attention (expanded k/v for cuDNN, GQA otherwise)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lorafit.kernels import causal_attention
    from lorafit.kernels.attention import _expand_kv

    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    ref, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=0.3)
    assert torch.allclose(causal_attention(q, k, v, 0.3, backend), ref, atol=1e-6)
    assert torch.equal(_expand_kv(k, 2), k.repeat_interleave(2, dim=1))
    with pytest.raises(ValueError, match="sdpa backend"):
        causal_attention(q, k, v, 0.3, "fast")
