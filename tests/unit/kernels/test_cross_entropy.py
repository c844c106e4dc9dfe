"""The chunked linear cross-entropy (`kernels/cross_entropy.py`), torch and Triton paths."""
from __future__ import annotations

import pytest
import torch

import lorafit.kernels.cross_entropy as ce_mod
from lorafit.kernels import causal_lm_loss_reference, fused_causal_lm_loss

from .helpers import DEV, as64, leaf, needs_triton, rel


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("items", [None, 7])
def test_fused_cross_entropy(path: str, items: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "torch":
        monkeypatch.setattr(ce_mod, "use_triton", lambda t: False)
    h, w = leaf(2, 9, 16), leaf(300, 16, scale=0.3)
    labels = torch.randint(0, 300, (2, 9), device=DEV)
    labels[0, 3], labels[1, :2] = -100, -100
    loss = fused_causal_lm_loss(h, w, labels, chunk=5, num_items_in_batch=items)
    loss.backward()
    h64, w64 = as64(h, w)
    ref = causal_lm_loss_reference(h64, w64, labels, num_items_in_batch=items)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert rel(h.grad, h64.grad) < 1e-5 and rel(w.grad, w64.grad) < 1e-5
