"""Seeded dropout (`kernels/dropout.py`): masks drawn inside the products, redrawn on recompute,
and resumed exactly by the trainer."""
from __future__ import annotations

import pytest
import torch

from lorafit.kernels import accelerate_model, accelerated

from .helpers import DEV, loss_and_grads, needs_triton, rel, tiny_peft


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


@needs_triton
def test_seeded_dropout_survives_checkpointing_without_rng_state() -> None:
    """Recomputed layers redraw the same seeded masks: checkpointed gradients equal plain ones."""
    model = tiny_peft("llama", dropout=0.3)
    accelerate_model(model, seeded_dropout=True)
    ids = torch.randint(0, 300, (2, 8), device=DEV)
    batch = {"input_ids": ids, "labels": ids}
    seed = accelerated(model).dropout_seed
    _, plain = loss_and_grads(model, batch)
    seed.value.sub_(1)  # the next forward draws the same masks again
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    _, ckpt = loss_and_grads(model, batch)
    assert max(rel(ckpt[n], plain[n]) for n in plain) < 1e-5


@needs_triton
def test_trainer_seeded_dropout_path_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch,
                                                     kill_training_at) -> None:
    """`fused_kernels: true` where Triton runs: LoRA dropout is drawn inside the fused products from the
    run's (seed, micro-batch) and a killed run resumes to the same adapter, bit for bit."""
    import json

    from safetensors.torch import load_file

    from lorafit.config import load_config
    import importlib

    from lorafit.kernels import lora as lora_mod
    from lorafit.training import loop

    # Triton's interpreter for the LoRA products only (the seeded-dropout kernels this test is about). The
    # other fused kernels take their torch paths, as whole-model tests do (`torch_paths`): run interpreted,
    # the cross-entropy over a 49k vocabulary, RoPE and RMSNorm were three quarters of this test's time, and
    # each is held to its reference in its own file.
    for name in ("cross_entropy", "rmsnorm", "rotary", "swiglu"):
        monkeypatch.setattr(importlib.import_module(f"lorafit.kernels.{name}"), "use_triton", lambda t: False)

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 1)))}
                                for i in range(8)]))

    def cfg(out):
        return load_config(None, dict(model=tiny_model_dir, data=[str(data)], output_dir=str(tmp_path / out),
                                      device="cpu", lora_rank=4, lora_alpha=8, lora_dropout=0.3, batch_size=2,
                                      max_steps=2, save_steps=1, logging_steps=1, warmup_steps=1, max_length=64,
                                      eval_steps=1000, fused_kernels=True))

    calls = {"n": 0}
    real = lora_mod.dropout_matmul

    def spy(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(lora_mod, "dropout_matmul", spy)
    ref = loop.train(cfg("ref"), progress=False).run_dir
    assert calls["n"] > 0
    kill_training_at(2)  # dies in step 2, after checkpoint step-1: the resumed step 2 must redraw its masks
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg("run"), progress=False)
    kill_training_at(None)
    run = loop.train(cfg("run"), progress=False)
    assert run.resumed_from == 1
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
