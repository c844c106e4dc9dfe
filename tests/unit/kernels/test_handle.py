"""The `Accelerated` handle (`kernels/accelerate.py`): it owns the settings, the dropout seed, the adapter
cache and the pre-forward hook, so nothing is hung on the transformers modules; `set_micro_batch(seed, k)`
makes micro-batch k's masks a pure function of (seed, k)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lorafit.kernels import Accelerated, accelerate_model, accelerated, causal_lm_loss, restore_model
from lorafit.kernels.accelerate import _HANDLES
from lorafit.kernels.modules import FusedAttention, FusedMLP, FusedRMSNorm

from .helpers import DEV, needs_triton, tiny_peft


def _own_attributes(model: torch.nn.Module) -> dict[str, set[str]]:
    """Each transformers/PEFT module's instance attributes (lorafit's fused modules left out)."""
    fused = (FusedAttention, FusedMLP, FusedRMSNorm)
    return {name: set(vars(m)) for name, m in model.named_modules() if not isinstance(m, fused)}


@pytest.mark.usefixtures("torch_paths")
def test_accelerate_hangs_nothing_on_transformers_modules() -> None:
    model = tiny_peft("llama")
    causal = model.get_base_model()
    before, hooks = _own_attributes(model), len(causal.model._forward_pre_hooks)
    assert accelerate_model(model, fused_residual=True) is model
    handle = accelerated(model)
    assert isinstance(handle, Accelerated) and accelerated(causal) is handle and handle.model is model
    assert handle.acceleration.fused_residual and handle.acceleration.swapped == 2 * 4 + 1
    assert handle.adapter_cache is not None and handle.dropout_seed is None
    after = _own_attributes(model)
    assert all(after[name] == attrs for name, attrs in before.items() if name in after)
    assert not [(n, a) for n, attrs in after.items() for a in attrs if a.startswith("lorafit")]
    assert len(causal.model._forward_pre_hooks) == hooks + 1  # the handle's: refreshes the adapter cache
    accelerate_model(model)  # again: a new handle, the old one's hook removed
    assert accelerated(model) is not handle and len(causal.model._forward_pre_hooks) == hooks + 1
    assert accelerated(model).restore() is model
    assert accelerated(model) is None and len(causal.model._forward_pre_hooks) == hooks
    assert not any(isinstance(m, (FusedAttention, FusedMLP, FusedRMSNorm)) for m in model.modules())
    assert _own_attributes(model) == before
    assert restore_model(model) is model  # a no-op on a restored model


@pytest.mark.usefixtures("torch_paths")
def test_a_dropped_model_takes_its_handle_with_it() -> None:
    """The registry holds models weakly: an accelerated model its caller drops is freed."""
    gc.collect()
    start = len(_HANDLES)
    model = tiny_peft("qwen2")
    accelerate_model(model)
    causal = weakref.ref(model.get_base_model())
    assert len(_HANDLES) == start + 1
    del model
    gc.collect()
    assert causal() is None and len(_HANDLES) == start


@pytest.mark.usefixtures("torch_paths")
def test_set_micro_batch_without_seeded_dropout_is_a_no_op() -> None:
    model = tiny_peft("llama", dropout=0.3)
    accelerate_model(model)
    accelerated(model).set_micro_batch(7, 3)  # PEFT's dropout draws from torch's RNG, which the caller seeds
    restore_model(model)


@needs_triton
def test_set_micro_batch_masks_are_a_function_of_seed_and_k() -> None:
    """Whatever ran before, micro-batch k draws the same masks; another k, or another seed, others. The
    forward draws from seed * 1_000_003 + k, the number the trainer has always used (resumes stay exact)."""
    model = tiny_peft("llama", dropout=0.3)
    accelerate_model(model, seeded_dropout=True)
    model.train()
    handle = accelerated(model)
    ids = torch.randint(0, 300, (2, 8), device=DEV)
    batch = {"input_ids": ids, "labels": ids}

    def loss(seed: int, k: int) -> torch.Tensor:
        handle.set_micro_batch(seed, k)
        with torch.no_grad():
            out = causal_lm_loss(model, batch)
        assert handle.dropout_seed.value.item() == seed * 1_000_003 + k
        return out

    first = loss(5, 3)
    other_k, other_seed = loss(5, 4), loss(6, 3)
    with torch.no_grad():
        causal_lm_loss(model, batch)  # an extra forward advances the counter
    again = loss(5, 3)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_k) and not torch.equal(first, other_seed)
    restore_model(model)
