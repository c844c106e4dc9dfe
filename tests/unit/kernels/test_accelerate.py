"""`accelerate_model` (`kernels/accelerate.py`, `kernels/modules.py`): a PEFT model with the fused
modules swapped in computes what PEFT computes, padded or packed, saves the same adapter and undoes."""
from __future__ import annotations

import pytest
import torch

from lorafit.data.packing import pack_batch, pad_batch
from lorafit.kernels import accelerate_model, accelerated, causal_lm_loss, restore_model
from lorafit.kernels.modules import FusedAttention, FusedMLP, FusedRMSNorm

from .helpers import DEV, loss_and_grads, rel, tiny_peft


@pytest.mark.usefixtures("torch_paths")
def test_adapter_cache_follows_parameter_updates() -> None:
    """The cast adapters are refreshed every forward: after an update the fused loss is the new model's."""
    model = tiny_peft("llama")
    accelerate_model(model)
    assert accelerated(model).adapter_cache is not None
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


@pytest.mark.usefixtures("torch_paths")
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_accelerated_model_matches_peft(kind: str) -> None:
    model = tiny_peft(kind)
    ids = torch.randint(0, 300, (2, 12), device=DEV)
    labels = ids.clone()
    labels[0, :3] = -100
    masked = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    keys = list(model.state_dict())
    ref_loss, ref_grads = loss_and_grads(model, masked)
    accelerate_model(model)
    layer = model.get_base_model().model.layers[0]
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
    assert isinstance(layer.input_layernorm, FusedRMSNorm)
    assert list(model.state_dict()) == keys
    for batch in (masked, {"input_ids": ids, "labels": labels}):  # HF's forward, then decoder_forward
        loss, grads = loss_and_grads(model, batch)
        assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
        assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4


@pytest.mark.usefixtures("torch_paths")
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_packed_equals_padded(kind: str) -> None:
    """HF's own packed-sequence support (position_ids) and lorafit's varlen path give the padded loss."""
    model = tiny_peft(kind)
    seqs = [torch.randint(0, 300, (n,)).tolist() for n in (5, 9, 3)]
    labels = [s[:] for s in seqs]
    labels[1][:4] = [-100] * 4

    def on(b: dict) -> dict:
        return {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in b.items()}

    padded, packed = on(pad_batch(seqs, labels)), on(pack_batch(seqs, labels))
    ref_loss, ref_grads = loss_and_grads(model, padded)
    hf_packed, _ = loss_and_grads(model, packed)
    accelerate_model(model)
    loss, grads = loss_and_grads(model, packed)
    assert abs(hf_packed - ref_loss) < 1e-5 and abs(loss - ref_loss) < 1e-5
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4


@pytest.mark.usefixtures("torch_paths")
def test_fixed_shape_pack_equals_plain_pack() -> None:
    model = tiny_peft("llama")
    accelerate_model(model)
    seqs = [torch.randint(0, 300, (n,)).tolist() for n in (5, 9, 3)]
    on = lambda b: {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    plain = causal_lm_loss(model, on(pack_batch(seqs, seqs))).item()
    fixed = causal_lm_loss(model, on(pack_batch(seqs, seqs, pad_to_tokens=24, pad_to_segments=6))).item()
    assert abs(plain - fixed) < 1e-5


@pytest.mark.usefixtures("torch_paths")
def test_adapter_saves_and_loads_unchanged(tmp_path) -> None:
    from peft import PeftModel

    model = tiny_peft("llama", dropout=0.1)
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
    model = tiny_peft("llama")
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
    model = tiny_peft("llama", dropout=0.2)
    accelerate_model(model, shared_dropout=False)
    ids = torch.randint(0, 300, (2, 8), device=DEV)
    loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.usefixtures("torch_paths")
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_fused_residual_and_pinned_sdpa_match_plain_acceleration(kind: str, ckpt: bool) -> None:
    """lorafit's own decoder-layer body (fused residual norm), the pinned SDPA kernel and the smaller
    checkpointed CE chunk give the loss and LoRA gradients of the plain accelerated model."""
    model = tiny_peft(kind)
    ids = torch.randint(0, 300, (2, 12), device=DEV)
    labels = ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    accelerate_model(model)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    if ckpt:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    accelerate_model(model, fused_residual=True, sdpa_backend="flash", checkpointed_ce_chunk=5)
    causal = model.get_base_model()
    calls = []
    hook = torch.nn.Module.register_forward_hook  # count the fused-body calls through its norm
    handle = hook(causal.model.layers[0].post_attention_layernorm, lambda *a: calls.append(1))
    loss, grads = loss_and_grads(model, batch)
    handle.remove()
    assert calls == []  # the fused body reads the norm's weight instead of calling the module
    assert accelerated(model).acceleration.ce_rows(300, ckpt) == (5 if ckpt else max(64, (1 << 27) // 300))
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4
    if ckpt:
        causal.gradient_checkpointing_disable()


@pytest.mark.usefixtures("torch_paths")
def test_full_rows_run_as_rows_with_the_one_row_loss_and_gradients() -> None:
    """Examples of one length that fill their bucket (`flat_batch`'s full-row case, run with plain causal
    attention) give the loss and gradients of the same examples laid end to end in one varlen row."""
    from lorafit.training.graphstep import flat_batch, graph_key

    model = tiny_peft("llama")
    accelerate_model(model)
    torch.manual_seed(1)
    ids = [torch.randint(0, 300, (64,)).tolist() for _ in range(2)]
    labels = [x[:5] + [-100] * 3 + x[8:] for x in ids]
    rows = flat_batch(ids, labels, budget=128, pad_id=0)
    assert rows["input_ids"].shape == (2, 64) and "cu_seq_lens_q" not in rows and graph_key(rows) == (2, 64, 0)
    one = pack_batch(ids, labels, pad_to_tokens=128, pad_to_segments=8)
    assert graph_key(one) == (1, 128, 9)
    loss_r, grads_r = loss_and_grads(model, {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in rows.items()})
    loss_o, grads_o = loss_and_grads(model, {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in one.items()})
    assert abs(loss_r - loss_o) < 1e-5 * abs(loss_o)
    for name in grads_o:
        assert rel(grads_r[name], grads_o[name]) < 1e-4, name
    # not full rows: unequal lengths, or rows that leave filler in their bucket, stay one varlen row
    assert "cu_seq_lens_q" in flat_batch([ids[0], ids[1][:63]], [labels[0], labels[1][:63]], budget=128, pad_id=0)
    assert "cu_seq_lens_q" in flat_batch([x[:60] for x in ids], [x[:60] for x in labels], budget=256, pad_id=0)
    assert flat_batch([ids[0] * 2], [labels[0] * 2], budget=256, pad_id=0)["input_ids"].shape == (1, 128)
