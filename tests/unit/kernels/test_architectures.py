"""`fused_kernels` on architectures it does not cover (found by running 14 tiny architectures through the
trainer): they are left as they are and train on their own loss, sliding windows are never dropped, and what
PEFT or the model cannot do is a one-line config error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorafit.config import load_config
from lorafit.errors import ConfigError
from lorafit.kernels import accelerate_model, accelerated, causal_lm_loss
from lorafit.model import apply_lora

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300)


def _peft(model):
    torch.manual_seed(0)
    model.requires_grad_(False)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft


def _batch(vocab: int = 300):
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _models():
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel)

    torch.manual_seed(0)
    yield "gpt2", GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=300))
    # a logit transform the fused cross-entropy would drop (Granite and Cohere scale theirs)
    yield "gemma2", Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=3.0,
                                                   attn_implementation="eager"))


@pytest.mark.parametrize("name,model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_an_architecture_the_kernels_do_not_cover_is_left_as_it_is(name, model):
    peft = _peft(model).eval()  # GPT-2's own dropout off: the two losses compare
    batch = _batch()
    reference = peft(**batch).loss.item()
    accelerate_model(peft)  # GPT-2 has no `.model` decoder: this raised AttributeError
    assert accelerated(peft).acceleration.swapped == 0 and not accelerated(peft).acceleration.fused_ce
    assert causal_lm_loss(peft, batch).item() == pytest.approx(reference, rel=1e-6)


def test_a_sliding_window_shorter_than_the_run_keeps_the_original_attention():
    from transformers import MistralConfig, MistralForCausalLM

    from lorafit.kernels.modules import FusedAttention

    def fused_layers(window, max_positions):
        torch.manual_seed(0)
        m = _peft(MistralForCausalLM(MistralConfig(**SMALL, sliding_window=window)))
        accelerate_model(m, max_positions=max_positions)
        return sum(isinstance(l.self_attn, FusedAttention) for l in m.get_base_model().model.layers)

    assert fused_layers(16, 64) == 0       # the window cuts within an example: HF's windowed attention
    assert fused_layers(16, None) == 0     # unknown span: no guess
    assert fused_layers(128, 64) == 2      # never cuts: fused
    assert fused_layers(None, None) == 2


def _cfg(tmp_path, **kw):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    return load_config(None, {"model": "m", "data": [str(data)], "output_dir": str(tmp_path / "o"), **kw})


def test_packing_on_a_model_that_ignores_packed_positions_is_refused(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=300, word_embed_proj_dim=32))
    with pytest.raises(ConfigError, match="does not keep packed examples apart") as e:
        apply_lora(model, _cfg(tmp_path, packing=True))
    assert e.value.field == "packing"
    apply_lora(model, _cfg(tmp_path))  # padded batches are fine


def test_moe_experts_with_lora_dropout_are_a_config_error(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    model = MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=2, num_experts_per_tok=1))
    try:
        apply_lora(model, _cfg(tmp_path, lora_dropout=0.0))
    except Exception as e:  # noqa: BLE001 - this PEFT may not adapt experts at all: nothing to check then
        pytest.skip(f"PEFT does not adapt this Mixtral: {e}")
    model = MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=2, num_experts_per_tok=1))
    try:
        apply_lora(model, _cfg(tmp_path, lora_dropout=0.1))
    except ConfigError as e:
        assert e.field == "lora_dropout" and "lora_dropout: 0" in e.message
    # (a PEFT that takes dropout on expert parameters trains it: no error to check)


def test_the_trainer_says_why_no_fused_kernels_ran(tmp_path, tiny_model_dir):
    """fused_kernels: true on GPT-2: trained on HF's own loss, and the start event says why not fused."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorafit.demoset import write_demo_data
    from lorafit.training import train

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=49152)).save_pretrained(folder)
    for f in Path(tiny_model_dir).iterdir():
        if "token" in f.name or f.name.endswith((".jinja", ".txt")) or f.name == "vocab.json":
            shutil.copy(f, folder / f.name)
    train_file, _ = write_demo_data(tmp_path / "data")
    cfg = load_config(None, {"model": str(folder), "data": [str(train_file)], "output_dir": str(tmp_path / "run"),
                             "max_steps": 2, "max_length": 64, "device": "cpu", "fused_kernels": True,
                             "eval_steps": 10, "save_steps": 10})
    run = train(cfg, progress=False).run_dir
    start = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert start["step_kind"] == "eager" and "no fused kernels for GPT2LMHeadModel" in start["step_fallback"]
    # FP8 base weights run only inside the fused products: on GPT-2 that is a config error, nothing written
    cfg.output_dir, cfg.quantize_base = str(tmp_path / "fp8"), "fp8"
    with pytest.raises(ConfigError, match="do not cover GPT2LMHeadModel") as e:
        train(cfg, progress=False)
    assert e.value.field == "quantize_base" and not (tmp_path / "fp8").exists()
