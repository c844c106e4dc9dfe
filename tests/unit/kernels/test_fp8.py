"""FP8 frozen GEMMs (`kernels/fp8.py`, `quantize_base: fp8`): row-wise e4m3 quantization, the two weight
copies, and the fused LoRA group's forward and backward using the right copy and scales for each product.

The exact checks rebuild the FP8 computation by hand from `quantize_rows_reference` (dequantized operands,
float64 products) and require the fused group to equal it; the loose checks bound the FP8 error against
the unquantized group. On a GPU the Triton quantizer is held to the reference too."""
from __future__ import annotations

import pytest
import torch

from lorafit.kernels import LoraProj, accelerate_model, accelerated, causal_lm_loss, lora_group, restore_model
from lorafit.kernels.fp8 import E4M3_MAX, Fp8Weight, Fp8Weights, fp8_supported, quantize_rows, quantize_rows_reference

from .helpers import DEV, leaf, rel, tiny_peft

pytestmark = pytest.mark.skipif(fp8_supported(DEV) is not None, reason=f"no FP8 products here: {fp8_supported(DEV)}")
EXACT = 1e-5 if DEV.type == "cpu" else 5e-3  # CUDA's row-wise FP8 GEMM rounds its output to bf16


def _deq(x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_rows_reference(x)
    return q.double() * s.double()


def test_rows_quantize_to_e4m3_with_one_scale_per_row() -> None:
    x = torch.randn(6, 48, device=DEV) * torch.logspace(-3, 3, 6, device=DEV)[:, None]
    x[2] = 0.0
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (6, 48) and s.shape == (6, 1) and s.dtype == torch.float32
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 3, 4, 5]], torch.full((5,), E4M3_MAX, device=DEV))
    assert q[2].float().eq(0).all() and s[2].item() > 0  # an all-zero row stays zero, its scale finite
    err = (q.float() * s - x).abs()
    # 3 mantissa bits: within half a step (1/16 of the value) of each element, whatever the row's magnitude
    assert (err <= x.abs() / 16 + s * 2.0 ** -9 + 1e-30).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton quantizer runs on CUDA only")
def test_triton_quantizer_equals_the_reference() -> None:
    x = (torch.randn(257, 14336 + 8, device="cuda") * 3).to(torch.bfloat16)
    q, s = quantize_rows(x)
    qr, sr = quantize_rows_reference(x)
    assert torch.allclose(s, sr, rtol=1e-6)
    assert (q.float() != qr.float()).float().mean() < 1e-3  # x / s vs x * (1 / s): a rare tie may round apart


def test_weight_copies_serve_forward_and_backward() -> None:
    w = torch.randn(32, 48, device=DEV)
    f = Fp8Weight.of(w)
    assert f.w.shape == (32, 48) and f.w_scale.shape == (1, 32) and f.wt.shape == (48, 32) and f.wt_scale.shape == (1, 48)
    assert f.nbytes() == 2 * 32 * 48 + 4 * (32 + 48)
    # each copy is scaled along the axis its GEMM keeps: W per output channel, W^T per input channel
    assert torch.allclose(f.w_scale.view(-1), w.abs().amax(1) / E4M3_MAX)
    assert torch.allclose(f.wt_scale.view(-1), w.abs().amax(0) / E4M3_MAX)
    cache = Fp8Weights()
    assert cache.get(w) is cache.get(w) and len(cache) == 1 and cache.nbytes == f.nbytes()
    assert cache.get(torch.randn(24, 48, device=DEV)) is None and len(cache) == 1  # FP8 GEMMs want sides of 16k


def test_a_projection_fp8_cannot_take_keeps_its_model_dtype_product() -> None:
    torch.manual_seed(2)
    projs, x = _projs(), leaf(2, 5, 48)
    odd = LoraProj(torch.randn(24, 48, device=DEV), None, leaf(4, 48, scale=0.3), leaf(24, 4, scale=0.3), 2.0)
    ys8, _, dx8, _ = _group(x, projs + [odd], Fp8Weights())
    ys, _, dx, _ = _group(x, projs + [odd], None)
    assert rel(ys8[3], ys[3]) < EXACT and all(0 < rel(a, b) < 0.08 for a, b in zip(ys8[:3], ys[:3]))
    assert 0 < rel(dx8, dx) < 0.08


def _projs() -> list[LoraProj]:
    out = []
    for n_out, r, bias in ((32, 4, True), (16, 2, False), (16, 4, False)):
        out.append(LoraProj(torch.randn(n_out, 48, device=DEV), torch.randn(n_out, device=DEV) if bias else None,
                            leaf(r, 48, scale=0.3), leaf(n_out, r, scale=0.3), 2.0))
    return out


def _group(x, projs, fp8):
    for t in [x] + [t for pr in projs for t in (pr.lora_A, pr.lora_B)]:
        t.grad = None
    ys = lora_group(x, projs, 0.0, True, fp8=fp8)
    torch.manual_seed(7)
    ups = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, ups)
    return [y.detach() for y in ys], ups, x.grad.clone(), [(pr.lora_A.grad.clone(), pr.lora_B.grad.clone()) for pr in projs]


def test_group_runs_each_frozen_product_on_its_fp8_copy() -> None:
    torch.manual_seed(0)
    projs, x = _projs(), leaf(2, 5, 48)
    ys, ups, dx, grads = _group(x, projs, Fp8Weights())
    xd = _deq(x.detach().reshape(-1, 48))
    want_dx = torch.zeros(10, 48, dtype=torch.float64, device=DEV)
    for pr, y, up, (da, db) in zip(projs, ys, ups, grads):
        a, b, s = pr.lora_A.detach().double(), pr.lora_B.detach().double(), pr.scaling
        x64 = x.detach().reshape(-1, 48).double()
        want = xd @ _deq(pr.weight).t() + s * (x64 @ a.t()) @ b.t()
        if pr.bias is not None:
            want = want + pr.bias.double()
        assert rel(y.reshape(10, -1), want) < EXACT
        dy = up.reshape(10, -1)
        want_dx += _deq(dy) @ _deq(pr.weight.t().contiguous()).t() + s * (dy.double() @ b) @ a
        assert rel(db, s * dy.double().t() @ (x64 @ a.t())) < 1e-5  # the adapter's own products stay unquantized
        assert rel(da, s * (dy.double() @ b).t() @ x64) < 1e-5
    assert rel(dx.reshape(10, 48), want_dx) < EXACT


def test_group_in_fp8_stays_near_the_unquantized_group() -> None:
    torch.manual_seed(1)
    projs, x = _projs(), leaf(4, 16, 48)
    ys8, _, dx8, g8 = _group(x, projs, Fp8Weights())
    ys, _, dx, g = _group(x, projs, None)
    assert all(0 < rel(a, b) < 0.08 for a, b in zip(ys8, ys))  # quantized (not equal), within e4m3's error
    assert 0 < rel(dx8, dx) < 0.08
    assert all(rel(a8, a) < 1e-6 and rel(b8, b) < 1e-6 for (a8, b8), (a, b) in zip(g8, g))  # x itself feeds them


def test_accelerate_model_fp8_base_trains_near_bf16(torch_paths) -> None:
    model = tiny_peft("llama")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16), device=DEV)
    batch = {"input_ids": ids, "labels": ids.clone()}
    out = {}
    for fp8 in (False, True):
        accelerate_model(model, fp8_base=fp8)
        handle = accelerated(model)
        assert handle.acceleration.fp8_base is fp8 and (handle.fp8_weights is not None) is fp8
        model.zero_grad()
        loss = causal_lm_loss(model, batch)
        loss.backward()
        out[fp8] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    # 7 adapted projections a layer, one copy each, made when accelerated (never inside a captured step)
    assert len(handle.fp8_weights) == 7 * len(model.get_base_model().model.layers)
    assert out[True][0] != out[False][0] and abs(out[True][0] - out[False][0]) < 0.01 * out[False][0]
    assert 0 < rel(out[True][1], out[False][1]) < 0.2


def test_offload_moves_each_copied_weight_to_host_and_restore_brings_it_back(torch_paths) -> None:
    model = tiny_peft("llama").to(DEV)
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    before = weight.detach().clone()
    accelerate_model(model, fp8_base=True, fp8_offload=True)
    fp8 = accelerated(model).fp8_weights
    on_gpu = DEV.type == "cuda"
    assert weight.device.type == "cpu"
    # on a GPU every copied weight (7 projections x 2 layers) waits on the host; host weights have nowhere to go
    n_weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "base_layer.weight" in n)
    assert fp8.offloaded_nbytes == (n_weights if on_gpu else 0)
    ids = torch.randint(0, 128, (2, 16), device=DEV)
    causal_lm_loss(model, {"input_ids": ids, "labels": ids.clone()}).backward()  # trains without them
    restore_model(model)
    assert weight.device.type == DEV.type and torch.equal(weight.detach(), before) and fp8.offloaded_nbytes == 0


def test_a_torch_without_the_product_is_named(monkeypatch) -> None:
    """Checked before training (an error naming quantize_base), not discovered in the first step."""
    def missing(*a, **k):
        raise RuntimeError("scaled_mm is not supported here\nmore detail")

    monkeypatch.setattr(torch, "_scaled_mm", missing)
    why = fp8_supported("cpu")
    assert why is not None and "row-wise scales" in why and why.endswith("scaled_mm is not supported here")
