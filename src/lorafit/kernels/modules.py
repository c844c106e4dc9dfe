"""Drop-in fused modules for Llama-family decoder layers (Llama, Qwen2, Qwen3, Mistral) wrapped by PEFT LoRA.

Each fused module takes over the original's children and parameters under the same attribute names
(q_proj, ..., gate_proj, ..., weight), so `state_dict()` keys, PEFT's adapter files and PEFT's own
adapter switching see exactly the model they saw before. The original module is kept (unregistered)
for `restore_model` and as the fallback whenever the fused path cannot reproduce its forward: a KV
cache (generation), a merged or disabled adapter, DoRA, several active adapters, a trainable base.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .attention import causal_attention, varlen_attention
from .dropout import DropoutSeed
from .fp8 import Fp8Weights
from .lora import AdapterCache, LoraProj, lora_group
from .rmsnorm import rms_norm
from .rotary import rope_qk, rope_reference
from .swiglu import swiglu, swiglu_reference

__all__ = ["FusedAttention", "FusedMLP", "FusedRMSNorm", "lora_proj", "project"]


def _frozen(*ts: torch.Tensor | None) -> bool:
    return all(t is None or not t.requires_grad for t in ts)


def lora_proj(module: nn.Module) -> tuple[LoraProj, float, bool] | None:
    """(projection, dropout p, dropout active) of a PEFT lora.Linear or a frozen nn.Linear; None when
    the fused maths would not equal the module's own forward."""
    base = getattr(module, "base_layer", None)
    if base is None:
        if type(module) is nn.Linear and _frozen(module.weight, module.bias):
            return LoraProj(module.weight, module.bias, None, None, 1.0), 0.0, False
        return None
    if type(base) is not nn.Linear or not _frozen(base.weight, base.bias):
        return None
    if module.disable_adapters or module.merged or getattr(module, "fan_in_fan_out", False):
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    if getattr(b, "bias", None) is not None:
        return None
    drop = module.lora_dropout[name]
    p = float(getattr(drop, "p", 0.0))
    return LoraProj(base.weight, base.bias, a.weight, b.weight, float(module.scaling[name])), p, drop.training


def project(x: torch.Tensor, modules: Sequence[nn.Module], fused: bool, shared_dropout: bool,
            seed: DropoutSeed | None = None, site: int = 0, cache: AdapterCache | None = None,
            fp8: Fp8Weights | None = None) -> list[torch.Tensor]:
    """Every module applied to x: one fused LoRA group when possible, else each module's own forward.

    With a DropoutSeed the masks are seeded (call site `site`, or 8 * site + i per projection when
    the projections keep independent masks). With `fp8` the adapted projections' frozen GEMMs run in FP8."""
    specs = [lora_proj(m) for m in modules] if fused else [None]
    if any(s is None for s in specs):
        return [m(x) for m in modules]
    adapted = {(p, on) for pr, p, on in specs if pr.lora_A is not None}  # type: ignore[misc]
    if shared_dropout and len(adapted) <= 1:
        p, on = adapted.pop() if adapted else (0.0, False)
        return lora_group(x, [s[0] for s in specs], p, on,  # type: ignore[index]
                          seed=None if seed is None else (seed.value, site), cache=cache, fp8=fp8)
    return [lora_group(x, [pr], p, on, seed=None if seed is None else (seed.value, 8 * site + i), cache=cache,
                       fp8=fp8)[0]
            for i, (pr, p, on) in enumerate(specs)]  # type: ignore[misc]


def _head_norm(norm: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A per-head RMSNorm (Qwen3's q_norm / k_norm) through the fused kernel."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return rms_norm(t, norm.weight, float(eps)) if eps is not None else norm(t)


def _copy_attrs(dst: nn.Module, src: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))


class _Fused(nn.Module):
    """Keeps the original module out of the module tree (no duplicate state_dict keys)."""

    dropout_seed: DropoutSeed | None = None  # set by accelerate_model(seeded_dropout=True)
    dropout_site: int = 0
    adapter_cache: AdapterCache | None = None  # set by accelerate_model(adapter_cache=True)
    fp8_weights: Fp8Weights | None = None  # set by accelerate_model(fp8_base=True)

    def _keep_reference(self, orig: nn.Module) -> None:
        object.__setattr__(self, "reference_module", orig)
        self.training = orig.training

    def _reference_forward(self, *args: Any, **kwargs: Any) -> Any:
        ref = self.reference_module
        ref.training = self.training
        return ref(*args, **kwargs)


def _attention_interface(impl: str | None, eager: Callable) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl in (None, "eager"):
        return eager
    get = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    return get(impl, eager) if get is not None else ALL_ATTENTION_FUNCTIONS[impl]


class FusedAttention(_Fused):
    """Self-attention: fused q/k/v LoRA group, fused rotary, varlen flash for packed rows, fused o LoRA."""

    def __init__(self, orig: nn.Module, *, fused_lora: bool = True, fused_rope: bool = True,
                 varlen: bool = True, shared_dropout: bool = True, sdpa_backend: str | None = None) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = orig.q_proj, orig.k_proj, orig.v_proj, orig.o_proj
        # Qwen3: RMSNorm over each head of q and k, before rotary (the same children, so the same state_dict keys)
        self.q_norm, self.k_norm = getattr(orig, "q_norm", None), getattr(orig, "k_norm", None)
        _copy_attrs(self, orig, ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling",
                                 "attention_dropout", "is_causal", "sliding_window", "layer_type"))
        self.fused_lora, self.fused_rope, self.varlen, self.shared_dropout = fused_lora, fused_rope, varlen, shared_dropout
        self.sdpa_backend = sdpa_backend
        self._eager = getattr(sys.modules[type(orig).__module__], "eager_attention_forward", None)
        self._keep_reference(orig)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None or position_embeddings is None:
            return self._reference_forward(hidden_states, position_embeddings=position_embeddings,
                                           attention_mask=attention_mask, **kwargs)
        b, s, _ = hidden_states.shape
        q, k, v = project(hidden_states, (self.q_proj, self.k_proj, self.v_proj), self.fused_lora,
                          self.shared_dropout, self.dropout_seed, 4 * self.dropout_site, self.adapter_cache,
                          self.fp8_weights)
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = _head_norm(self.q_norm, q), _head_norm(self.k_norm, k)
        cos, sin = position_embeddings
        if self.fused_rope:
            q, k = rope_qk(q, k, cos, sin)
        else:
            q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
        cu = kwargs.get("cu_seq_lens_q")
        if self.varlen and cu is not None and b == 1 and not self._windowed(int(kwargs["max_length_q"])):
            o = varlen_attention(q[0], k[0], v[0], cu, int(kwargs["max_length_q"]), self.scaling)
        elif self._pinned_sdpa(attention_mask, s, cu):
            o = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scaling,
                                 self.sdpa_backend)
        else:
            extra = {"sliding_window": self.sliding_window} if hasattr(self, "sliding_window") else {}
            rest = {key: val for key, val in kwargs.items() if key not in ("cache", "past_key_values")}
            attend = _attention_interface(self.config._attn_implementation, self._eager)
            o, _ = attend(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                          dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
                          **extra, **rest)
        o = o.reshape(b, s, -1)
        return project(o, (self.o_proj,), self.fused_lora, self.shared_dropout, self.dropout_seed,
                       4 * self.dropout_site + 1, self.adapter_cache, self.fp8_weights)[0], None


    def _windowed(self, span: int) -> bool:
        """Whether a sliding window can cut attention over `span` tokens (accelerate_model swaps only layers
        whose window is at least the run's max_positions, so within an example it never does)."""
        window = getattr(self, "sliding_window", None)
        return window is not None and window < span

    def _pinned_sdpa(self, attention_mask: torch.Tensor | None, s: int, cu: torch.Tensor | None) -> bool:
        """Whether this call is plain causal attention that `causal_attention` can take with a pinned kernel."""
        return (self.sdpa_backend is not None and attention_mask is None and cu is None and s > 1
                and not self._windowed(s) and getattr(self, "is_causal", True)
                and (not self.training or not self.attention_dropout))


class FusedMLP(_Fused):
    """SwiGLU MLP: fused gate/up LoRA group, fused silu(g) * u, fused down LoRA."""

    def __init__(self, orig: nn.Module, *, fused_lora: bool = True, fused_swiglu: bool = True,
                 shared_dropout: bool = True) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = orig.gate_proj, orig.up_proj, orig.down_proj
        self.fused_lora, self.fused_swiglu, self.shared_dropout = fused_lora, fused_swiglu, shared_dropout
        self._keep_reference(orig)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = project(x, (self.gate_proj, self.up_proj), self.fused_lora, self.shared_dropout, self.dropout_seed,
                       4 * self.dropout_site + 2, self.adapter_cache, self.fp8_weights)
        a = swiglu(g, u) if self.fused_swiglu else swiglu_reference(g, u)
        return project(a, (self.down_proj,), self.fused_lora, self.shared_dropout, self.dropout_seed,
                       4 * self.dropout_site + 3, self.adapter_cache, self.fp8_weights)[0]


class FusedRMSNorm(_Fused):
    """RMSNorm through the Triton kernel; same `weight` parameter and epsilon."""

    def __init__(self, orig: nn.Module) -> None:
        super().__init__()
        self.weight = orig.weight
        self.variance_epsilon = float(getattr(orig, "variance_epsilon", getattr(orig, "eps", 1e-6)))
        self._keep_reference(orig)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)
