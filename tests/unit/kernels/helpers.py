"""What the kernel tests share: the device, tolerances, relative error, leaves with gradients, and a
tiny PEFT model (Llama or Qwen2) to accelerate."""
from __future__ import annotations

import pytest
import torch

from lorafit.kernels import causal_lm_loss
from lorafit.kernels._triton import use_triton

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


def tiny_peft(kind: str, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    cfg_cls, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                    "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    extra = {"head_dim": 8} if kind == "qwen3" else {}
    torch.manual_seed(0)
    model = cls(cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=300, attn_implementation="sdpa", **extra)).to(DEV)
    if kind == "qwen3":  # q_norm / k_norm start at ones: other weights, so a norm the fused path skipped shows
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    model.requires_grad_(False)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # non-zero B: gradients reach A too
    return peft


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
