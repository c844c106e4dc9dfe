"""Every fast path in lorafit.kernels equals its reference, forward and gradients, on small shapes.

The Triton kernels run on CPU through Triton's interpreter when triton is importable (tests/conftest.py
turns the interpreter on before anything imports lorafit.kernels, when there is no GPU); without triton those
cases skip and the pure-torch fused paths (LoRA groups, chunked cross-entropy, packing, the fused
modules' fallbacks) are still checked. GPU timings and errors at model sizes: benchmarks/bench_speed.py.
"""
from __future__ import annotations


import pytest
import torch

import lorafit.kernels.cross_entropy as ce_mod
from lorafit.kernels import (LoraProj, accelerate_model, causal_lm_loss, causal_lm_loss_reference,
                             fused_causal_lm_loss, lora_group, lora_group_reference, pack_batch, pad_batch,
                             plan_packs, restore_model, rms_norm, rms_norm_reference, rope, rope_reference,
                             swiglu, swiglu_reference, varlen_attention_reference)
from lorafit.kernels._triton import use_triton
from lorafit.kernels.modules import FusedAttention, FusedMLP, FusedRMSNorm

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEV)),
                                  reason="triton not importable here (or interpreter not enabled at import)")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def leaf(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV) * scale).to(dtype).requires_grad_(True)


def fwd_bwd(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = fn(*inputs)
    torch.manual_seed(123)
    out.backward(torch.randn(out.shape, device=out.device).to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def as64(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().double().requires_grad_(True) for t in ts]


# --- elementwise kernels against HF's eager maths ------------------------------------------------
def test_rms_norm_reference_is_hf() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(48, eps=1e-5).to(DEV)
    torch.nn.init.uniform_(hf.weight, 0.5, 1.5)
    x = torch.randn(3, 5, 48, device=DEV)
    assert torch.equal(hf(x), rms_norm_reference(x, hf.weight, 1e-5))


def test_rope_reference_is_hf() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 2, 16)
    cos, sin = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.allclose(hq.transpose(1, 2), rope_reference(q, cos, sin))
    assert torch.allclose(hk.transpose(1, 2), rope_reference(k, cos, sin))


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
def test_swiglu_kernel(dtype: torch.dtype) -> None:
    g, u = leaf(4, 1500, dtype=dtype), leaf(4, 1500, dtype=dtype)
    out, grads = fwd_bwd(swiglu, g, u)
    ref, refs = fwd_bwd(swiglu_reference, *as64(g, u))
    assert rel(out, ref) < TOL[dtype]
    assert all(rel(a, b) < TOL[dtype] for a, b in zip(grads, refs))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel(dtype: torch.dtype) -> None:
    x = leaf(2, 7, 3, 16, dtype=dtype)
    emb = torch.arange(7, device=DEV)[:, None] * torch.rand(8, device=DEV)
    cos, sin = torch.cat([emb, emb], -1).cos()[None].to(dtype), torch.cat([emb, emb], -1).sin()[None].to(dtype)
    out, (dx,) = fwd_bwd(lambda t: rope(t, cos, sin), x)
    ref, (dx64,) = fwd_bwd(lambda t: rope_reference(t, cos.double(), sin.double()), *as64(x))
    assert rel(out, ref) < TOL[dtype] and rel(dx, dx64) < TOL[dtype]


# --- chunked linear cross-entropy ----------------------------------------------------------------
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


# --- fused LoRA groups ---------------------------------------------------------------------------
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
    assert all(rel(a, b) < 1e-5 for a, b in zip(ys, yr)) and rel(x.grad, x64.grad) < 1e-5
    assert all(rel(pr.lora_A.grad, r.lora_A.grad) < 1e-5 for pr, r in zip(projs, ref))


@needs_triton
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_seeded_dropout_products_equal_dropout_then_matmul(alpha: float) -> None:
    """u = D(x)A^T, dA = g^T D(x) and dx = D'(gA) draw the mask inside the product; each equals the
    plain product on the dropped tensor, with splits and padded ranks (48 -> 64) exercised."""
    from lorafit.kernels.dropout import (DropoutSeed, dropout_matmul, dropout_matmul_t, matmul_dropout,
                                         seeded_keep_mask)

    seed, p = DropoutSeed(DEV, 9), 0.3
    n, k, r = 130, 300, 48
    x, a, g = torch.randn(n, k, device=DEV), torch.randn(r, k, device=DEV), torch.randn(n, r, device=DEV)
    keep = seeded_keep_mask((n, k), seed.value, 3, p, DEV)
    assert 0.6 < keep.float().mean().item() < 0.8
    xd = x * keep / (1 - p)
    assert rel(dropout_matmul(x, a, seed.value, 3, p, alpha=alpha), alpha * xd @ a.t()) < 1e-5
    assert rel(dropout_matmul_t(g, x, seed.value, 3, p, alpha=alpha), alpha * g.t() @ xd) < 1e-5
    assert rel(matmul_dropout(g, a, seed.value, 3, p, alpha=alpha), alpha * (g @ a) * keep / (1 - p)) < 1e-5
    other = seeded_keep_mask((n, k), seed.value, 4, p, DEV)  # another call site: an independent mask
    assert 0.35 < (other != keep).float().mean().item() < 0.49


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
    assert all(rel(a, b) < 1e-5 for a, b in zip(ys, yr)) and rel(x.grad, xr.grad) < 1e-5
    assert all(rel(pr.lora_B.grad, r_.lora_B.grad) < 1e-5 and rel(pr.lora_A.grad, r_.lora_A.grad) < 1e-5
               for pr, r_ in zip(projs, ref))


@pytest.mark.usefixtures("torch_paths")
def test_adapter_cache_follows_parameter_updates() -> None:
    """The cast adapters are refreshed every forward: after an update the fused loss is the new model's."""
    model = _peft("llama")
    accelerate_model(model)
    assert model.get_base_model().lorafit_adapter_cache is not None
    model.eval()
    ids = torch.randint(0, 300, (2, 8), device=DEV)
    batch = {"input_ids": ids, "labels": ids}
    before = causal_lm_loss(model, batch).item()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_" in name:
                prm.add_(torch.randn_like(prm) * 0.2)
    after = causal_lm_loss(model, batch).item()
    restore_model(model)
    assert abs(after - before) > 1e-3
    assert abs(after - model(**batch).loss.item()) < 1e-5


# --- packing and varlen attention ----------------------------------------------------------------
def test_pack_batch_layout() -> None:
    b = pack_batch([[5, 6, 7], [8, 9]], [[-100, 6, 7], [8, 9]])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5] and b["max_length_q"] == 3
    assert plan_packs([3, 4, 2, 5, 1], 6) == [[0], [1, 2], [3, 4]]


def test_varlen_reference_equals_block_diagonal_mask() -> None:
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu = torch.tensor([0, 4, 9])
    seg = torch.repeat_interleave(torch.arange(2), torch.tensor([4, 5]))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=allowed, scale=0.3).transpose(0, 1)
    assert torch.allclose(varlen_attention_reference(q, k, v, cu, 0.3), dense, atol=1e-6)


# --- the fused modules inside a PEFT model -------------------------------------------------------
@pytest.fixture
def torch_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole-model tests take the torch paths on CPU: the interpreter is too slow for them, and each
    kernel is held to its reference above (on GPU, bench_speed's grad parity covers the whole model)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("LORAFIT_NO_TRITON", "1")


def _peft(kind: str, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    model = cls(cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=300, attn_implementation="sdpa")).to(DEV)
    model.requires_grad_(False)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # non-zero B: gradients reach A too
    return peft


def _loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.usefixtures("torch_paths")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_accelerated_model_matches_peft(kind: str) -> None:
    model = _peft(kind)
    ids = torch.randint(0, 300, (2, 12), device=DEV)
    labels = ids.clone()
    labels[0, :3] = -100
    masked = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    keys = list(model.state_dict())
    ref_loss, ref_grads = _loss_and_grads(model, masked)
    accelerate_model(model)
    layer = model.get_base_model().model.layers[0]
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
    assert isinstance(layer.input_layernorm, FusedRMSNorm)
    assert list(model.state_dict()) == keys
    for batch in (masked, {"input_ids": ids, "labels": labels}):  # HF's forward, then decoder_forward
        loss, grads = _loss_and_grads(model, batch)
        assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
        assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4


@pytest.mark.usefixtures("torch_paths")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_equals_padded(kind: str) -> None:
    """HF's own packed-sequence support (position_ids) and lorafit's varlen path give the padded loss."""
    model = _peft(kind)
    seqs = [torch.randint(0, 300, (n,)).tolist() for n in (5, 9, 3)]
    labels = [s[:] for s in seqs]
    labels[1][:4] = [-100] * 4

    def on(b: dict) -> dict:
        return {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in b.items()}

    padded, packed = on(pad_batch(seqs, labels)), on(pack_batch(seqs, labels))
    ref_loss, ref_grads = _loss_and_grads(model, padded)
    hf_packed, _ = _loss_and_grads(model, packed)
    accelerate_model(model)
    loss, grads = _loss_and_grads(model, packed)
    assert abs(hf_packed - ref_loss) < 1e-5 and abs(loss - ref_loss) < 1e-5
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4


@needs_triton
def test_seeded_dropout_survives_checkpointing_without_rng_state() -> None:
    """Recomputed layers redraw the same seeded masks: checkpointed gradients equal plain ones."""
    model = _peft("llama", dropout=0.3)
    accelerate_model(model, seeded_dropout=True)
    ids = torch.randint(0, 300, (2, 8), device=DEV)
    batch = {"input_ids": ids, "labels": ids}
    seed = model.get_base_model().lorafit_dropout_seed
    _, plain = _loss_and_grads(model, batch)
    seed.value.sub_(1)  # the next forward draws the same masks again
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    _, ckpt = _loss_and_grads(model, batch)
    assert max(rel(ckpt[n], plain[n]) for n in plain) < 1e-5


@pytest.mark.usefixtures("torch_paths")
def test_fixed_shape_pack_equals_plain_pack() -> None:
    model = _peft("llama")
    accelerate_model(model)
    seqs = [torch.randint(0, 300, (n,)).tolist() for n in (5, 9, 3)]
    on = lambda b: {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    plain = causal_lm_loss(model, on(pack_batch(seqs, seqs))).item()
    fixed = causal_lm_loss(model, on(pack_batch(seqs, seqs, pad_to_tokens=24, pad_to_segments=6))).item()
    assert abs(plain - fixed) < 1e-5


@pytest.mark.usefixtures("torch_paths")
def test_adapter_saves_and_loads_unchanged(tmp_path) -> None:
    from peft import PeftModel

    model = _peft("llama", dropout=0.1)
    accelerate_model(model)
    model.save_pretrained(tmp_path)
    base = model.get_base_model()
    loaded = PeftModel.from_pretrained(type(base)(base.config).to(DEV), tmp_path)
    mine = {n: p for n, p in model.state_dict().items() if "lora_" in n}
    theirs = {n: p for n, p in loaded.state_dict().items() if "lora_" in n}
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[n].cpu(), theirs[n].cpu()) for n in mine)
    restore_model(model)
    assert type(model.get_base_model().model.layers[0].self_attn).__name__ == "LlamaAttention"


@pytest.mark.usefixtures("torch_paths")
def test_fallbacks_follow_peft_state() -> None:
    """Disabled or merged adapters and KV-cache generation take the original forward."""
    model = _peft("llama")
    model.eval()
    ids = torch.randint(0, 300, (1, 6), device=DEV)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with model.disable_adapter():
            ref_off = model(input_ids=ids).logits
        gen_ref = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        accelerate_model(model)
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)
        with model.disable_adapter():
            assert torch.allclose(model(input_ids=ids).logits, ref_off, atol=1e-5)
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), gen_ref)
        model.merge_adapter()
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-4)


@pytest.mark.usefixtures("torch_paths")
def test_independent_dropout_option_runs() -> None:
    model = _peft("llama", dropout=0.2)
    accelerate_model(model, shared_dropout=False)
    ids = torch.randint(0, 300, (2, 8), device=DEV)
    loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    loss.backward()
    assert torch.isfinite(loss)


def test_graph_step_refuses_an_optimizer_it_cannot_capture() -> None:
    from lorafit.kernels import CudaGraphStep

    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="capturable"):
        CudaGraphStep(torch.nn.Linear(3, 3), torch.optim.AdamW([w], capturable=False), {})


# --- issue 8 levers: fused residual norm, pinned SDPA, checkpointed CE chunk, host snapshot -------
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


@pytest.mark.usefixtures("torch_paths")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_fused_residual_and_pinned_sdpa_match_plain_acceleration(kind: str, ckpt: bool) -> None:
    """lorafit's own decoder-layer body (fused residual norm), the pinned SDPA kernel and the smaller
    checkpointed CE chunk give the loss and LoRA gradients of the plain accelerated model."""
    model = _peft(kind)
    ids = torch.randint(0, 300, (2, 12), device=DEV)
    labels = ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    accelerate_model(model)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    if ckpt:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    accelerate_model(model, fused_residual=True, sdpa_backend="flash", checkpointed_ce_chunk=5)
    causal = model.get_base_model()
    calls = []
    hook = torch.nn.Module.register_forward_hook  # count the fused-body calls through its norm
    handle = hook(causal.model.layers[0].post_attention_layernorm, lambda *a: calls.append(1))
    loss, grads = _loss_and_grads(model, batch)
    handle.remove()
    assert calls == []  # the fused body reads the norm's weight instead of calling the module
    assert causal.lorafit_acceleration.ce_rows(300, ckpt) == (5 if ckpt else max(64, (1 << 27) // 300))
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4
    if ckpt:
        causal.gradient_checkpointing_disable()


def test_graph_snapshot_on_host_restores_parameters_and_state() -> None:
    """CudaGraphStep's warm-up undo (device-free parts): a host snapshot puts values and state back."""
    from lorafit.kernels import CudaGraphStep

    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(4)
    opt.step()
    step = CudaGraphStep.__new__(CudaGraphStep)
    step.params, step.optimizer = [w], opt
    before = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
    saved = step._snapshot("cpu")
    for _ in range(2):
        opt.step()
    step._restore(saved)
    assert torch.equal(w.detach(), before[0])
    assert all(torch.equal(opt.state[w][k], v) for k, v in before[1].items())


@needs_triton
def test_trainer_seeded_dropout_path_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch,
                                                     kill_training_at) -> None:
    """`fused_kernels: true` where Triton runs: LoRA dropout is drawn inside the fused products from the
    run's (seed, micro-batch) and a killed run resumes to the same adapter, bit for bit."""
    import json

    from safetensors.torch import load_file

    from lorafit.config import load_config
    from lorafit.kernels import lora as lora_mod
    from lorafit.training import loop

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 1)))}
                                for i in range(8)]))

    def cfg(out):
        return load_config(None, dict(model=tiny_model_dir, data=[str(data)], output_dir=str(tmp_path / out),
                                      device="cpu", lora_rank=4, lora_alpha=8, lora_dropout=0.3, batch_size=2,
                                      max_steps=4, save_steps=2, logging_steps=1, warmup_steps=1, max_length=64,
                                      eval_steps=1000, fused_kernels=True))

    calls = {"n": 0}
    real = lora_mod.dropout_matmul

    def spy(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(lora_mod, "dropout_matmul", spy)
    ref = loop.train(cfg("ref"), progress=False).run_dir
    assert calls["n"] > 0
    kill_training_at(3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg("run"), progress=False)
    kill_training_at(None)
    run = loop.train(cfg("run"), progress=False)
    assert run.resumed_from == 2
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
