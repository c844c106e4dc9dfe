"""`evaluate_run` end to end on the real SmolLM2-135M-Instruct (GGUF), kept to a few prompts and tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafit.config import load_config, save_config
from lorafit.evaluation import evaluate_run, score_file
from lorafit.model import apply_lora

pytestmark = pytest.mark.integration


# SmolLM2-135M's architecture (its config.json). Written out because reading it from the GGUF parses the
# whole 49k-token vocabulary (seconds); a wrong number here fails loudly when PEFT loads the adapter.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def _zero_adapter(cfg, out: Path) -> None:
    """A freshly initialised LoRA adapter (B = 0) for the real architecture, made on the meta device:
    the GGUF is then loaded once, inside evaluate_run, which is what this test means to pay for."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    peft = apply_lora(model, cfg)
    peft.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_A" in name:
                torch.nn.init.normal_(p, std=0.02)
            elif "lora_B" in name:
                torch.nn.init.zeros_(p)
    peft.save_pretrained(out)


def test_eval_smollm2_base_vs_zero_adapter(tmp_path, smollm2_gguf, gguf_loaded_once):
    qa = [{"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
          {"instruction": "What is 2 + 2?", "output": "2 + 2 = 4."}]
    (tmp_path / "qa.json").write_text(json.dumps(qa), encoding="utf-8")
    (tmp_path / "general.jsonl").write_text(json.dumps(
        {"text": "### Human: Who wrote Hamlet? ### Assistant: William Shakespeare wrote Hamlet."}) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(overrides={"model": smollm2_gguf, "data": [str(tmp_path / "qa.json")],
                                 "val_data": {"qa": str(tmp_path / "qa.json")},
                                 "general_eval": str(tmp_path / "general.jsonl"), "output_dir": str(run)})
    save_config(cfg, run / "config.yaml")
    _zero_adapter(cfg, run / "adapter")

    metrics = evaluate_run(run, max_new_tokens=8, batch_size=4, device="cpu", progress=False)

    base = [json.loads(x) for x in (run / "eval" / "predictions-base-qa.jsonl").read_text().splitlines()]
    assert "Paris" in base[0]["predict"]  # the real model answers; the prompt went through its template
    for name, s in metrics["sets"].items():
        assert s["after"] == s["before"], name  # a zero adapter (B = 0) leaves the model unchanged
        assert s["loss_after"] == pytest.approx(s["loss_before"], rel=1e-6)
        assert 0 < s["loss_before"] < 10
    assert metrics["sets"]["qa"]["before"]["rouge-1"] > 20
    again = score_file(run / "eval" / "predictions-tuned-qa.jsonl")
    assert again == pytest.approx(metrics["sets"]["qa"]["after"], abs=1e-9)
