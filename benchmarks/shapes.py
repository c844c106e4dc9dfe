"""What the speed benchmarks train on, so that none of them builds a model or a batch of its own:
random-weight model folders of real shapes (a folder `lorafit train` loads like any HF model), and
synthetic examples long enough that every one is truncated to exactly `max_length` tokens.

Imported by the benchmarks beside it (`python benchmarks/bench_speed.py` puts this folder on sys.path).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "benchmarks" / "assets" / "smollm2-tokenizer"

# The real architectures (random weights: speed does not depend on the values). The vocabularies are the
# models' own, so the output head costs what it costs in the real model; the tokenizer is SmolLM2's,
# whose ids are all below every vocabulary here.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(family="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1e6,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen3-8b": dict(family="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # for the CPU smoke tests of the benchmarks' drivers (every SmolLM2 token id fits its vocabulary)
    "tiny-llama": dict(family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, rope_theta=10000.0,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "smollm2-135m": dict(family="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 datasheet figures (SXM)


def build_model_folder(shape: str, dst: Path, *, device: str = "cuda") -> Path:
    """A bf16 model folder of the named shape with SmolLM2's tokenizer; kept when it already holds one."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    dst = Path(dst)
    if (dst / "config.json").is_file():
        return dst
    spec = dict(SHAPES[shape])
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[spec.pop("family")]
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(cfg_cls(**spec, torch_dtype="bfloat16")).to(torch.bfloat16)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, dst / f.name)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dst


_SYLLABLES = "ka lo mi ne su ta ri po ve du sha ki mo ra te lu ze fi no ga".split()


def write_long_examples(path: Path, n: int, max_length: int, seed: int = 0) -> Path:
    """`n` alpaca examples whose answers run past `max_length` tokens: lorafit's truncation keeps the
    prompt and cuts the answer, so every encoded example is exactly `max_length` tokens and batches of
    them have no padding (what "2 x 1024 tokens a step" means)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(k))

    rows = [{"instruction": f"Continue the list {i}: {words(4)}", "input": "", "output": words(max_length + 64)}
            for i in range(n)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def flops_per_token(model_dir: Path, ctx_mean: float) -> float:
    """Training FLOPs per token of a model folder: 4 N (N = weights of every linear layer and the output
    head; forward 2N plus 2N for activation gradients, none for frozen weights; recomputation under
    checkpointing not counted) plus attention (3 x 4 x layers x heads x head_dim x mean causal context)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, i, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    hd = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads") or heads
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i
    n = c["num_hidden_layers"] * per_layer + h * c["vocab_size"]
    return 4 * n + 3 * 4 * c["num_hidden_layers"] * heads * hd * ctx_mean
