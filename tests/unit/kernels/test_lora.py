"""Fused LoRA groups (`kernels/lora.py`) against PEFT's maths, with given, drawn and seeded masks."""
from __future__ import annotations

import pytest
import torch

from lorafit.kernels import LoraProj, lora_group, lora_group_reference
from lorafit.kernels._triton import use_triton

from .helpers import DEV, TOL, as64, leaf, needs_triton, rel


# The seeded products are Triton dots: on a GPU they take float32 operands as TF32 (10-bit mantissas)
SEEDED_TOL = 1e-5 if DEV.type == "cpu" else 2e-3


def _projs(dtype: torch.dtype, n_in: int = 24) -> list[LoraProj]:
    out = []
    for n_out, r, bias in ((24, 4, True), (8, 2, False), (8, 4, False)):
        out.append(LoraProj(torch.randn(n_out, n_in, device=DEV).to(dtype),
                            torch.randn(n_out, device=DEV).to(dtype) if bias else None,
                            leaf(r, n_in, scale=0.3), leaf(n_out, r, scale=0.3), 2.0))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_group_matches_peft_maths(dtype: torch.dtype, p: float) -> None:
    projs = _projs(dtype)
    x = leaf(2, 5, 24, dtype=dtype)
    mask = torch.rand(2, 5, 24, device=DEV) > p
    ys = lora_group(x, projs, p, True, mask=mask)
    upstream = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, upstream)
    x64, = as64(x)
    ref = [LoraProj(pr.weight.double(), None if pr.bias is None else pr.bias.double(),
                    *as64(pr.lora_A, pr.lora_B), pr.scaling) for pr in projs]
    yr = lora_group_reference(x64, ref, p, True, mask=mask)
    torch.autograd.backward(yr, [g.double() for g in upstream])
    assert all(rel(a, b) < TOL[dtype] for a, b in zip(ys, yr))
    assert rel(x.grad, x64.grad) < TOL[dtype]
    for pr, pr64 in zip(projs, ref):
        assert pr.lora_A.grad.dtype == torch.float32
        assert rel(pr.lora_A.grad, pr64.lora_A.grad) < TOL[dtype]
        assert rel(pr.lora_B.grad, pr64.lora_B.grad) < TOL[dtype]


def test_lora_group_draws_one_mask_per_group() -> None:
    """Without a given mask the group draws one (native_dropout); replaying the RNG gives the same maths."""
    projs = _projs(torch.float32)
    x = leaf(6, 24)
    torch.manual_seed(5)
    ys = lora_group(x, projs, 0.5, True)
    torch.manual_seed(5)
    _, mask = torch.native_dropout(x.detach().reshape(-1, 24), 0.5, True)
    yr = lora_group_reference(x.detach(), projs, 0.5, True, mask=mask)
    assert all(rel(a, b) < 1e-5 for a, b in zip(ys, yr))
    assert not all(torch.allclose(a, b) for a, b in zip(ys, lora_group(x, projs, 0.0, True)))


@needs_triton
def test_seeded_dropout_group_matches_reference_with_its_mask() -> None:
    from lorafit.kernels.dropout import DropoutSeed, seeded_keep_mask

    projs, seed = _projs(torch.float32), DropoutSeed(DEV, 3)
    x = leaf(2, 5, 24)
    ys = lora_group(x, projs, 0.3, True, seed=(seed.value, 7))
    upstream = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, upstream)
    mask = seeded_keep_mask((10, 24), seed.value, 7, 0.3, DEV).view(2, 5, 24)
    x64, = as64(x)
    ref = [LoraProj(pr.weight.double(), None if pr.bias is None else pr.bias.double(),
                    *as64(pr.lora_A, pr.lora_B), pr.scaling) for pr in projs]
    yr = lora_group_reference(x64, ref, 0.3, True, mask=mask)
    torch.autograd.backward(yr, [g.double() for g in upstream])
    assert all(rel(a, b) < SEEDED_TOL for a, b in zip(ys, yr)) and rel(x.grad, x64.grad) < SEEDED_TOL
    assert all(rel(pr.lora_A.grad, r.lora_A.grad) < SEEDED_TOL for pr, r in zip(projs, ref))


@pytest.mark.parametrize("seeded", [True, False])
def test_group_with_unequal_scalings_matches_reference(seeded: bool) -> None:
    """Groups whose projections scale differently scale each B instead of the shared u."""
    if seeded and not use_triton(torch.empty(0, device=DEV)):
        pytest.skip("triton not importable here")
    from lorafit.kernels.dropout import DropoutSeed, seeded_keep_mask

    projs, seed = _projs(torch.float32), DropoutSeed(DEV, 4)
    projs[1].scaling, projs[2].scaling = 0.5, 3.0
    x = leaf(2, 5, 24)
    if seeded:
        ys = lora_group(x, projs, 0.2, True, seed=(seed.value, 2))
        mask = seeded_keep_mask((10, 24), seed.value, 2, 0.2, DEV).view(2, 5, 24)
    else:
        mask = torch.rand(2, 5, 24, device=DEV) > 0.2
        ys = lora_group(x, projs, 0.2, True, mask=mask)
    upstream = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, upstream)
    ref = [LoraProj(pr.weight, pr.bias, leaf(0), leaf(0), pr.scaling) for pr in projs]
    for r_, pr in zip(ref, projs):
        r_.lora_A, r_.lora_B = pr.lora_A.detach().clone().requires_grad_(True), pr.lora_B.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    yr = lora_group_reference(xr, ref, 0.2, True, mask=mask)
    torch.autograd.backward(yr, upstream)
    tol = SEEDED_TOL if seeded else 1e-5
    assert all(rel(a, b) < tol for a, b in zip(ys, yr)) and rel(x.grad, xr.grad) < tol
    assert all(rel(pr.lora_B.grad, r_.lora_B.grad) < tol and rel(pr.lora_A.grad, r_.lora_A.grad) < tol
               for pr, r_ in zip(projs, ref))
