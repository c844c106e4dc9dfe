"""`evaluate_run` end to end on the real SmolLM2-135M-Instruct (GGUF), kept to a few prompts and tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafit.config import load_config, save_config
from lorafit.evaluate import evaluate_run, score_file
from lorafit.model import apply_lora

pytestmark = pytest.mark.integration


def _zero_adapter(gguf: str, cfg, out: Path) -> None:
    """A freshly initialised LoRA adapter (B = 0) for the real architecture, made without loading the
    weights (meta device): loading the GGUF once, inside evaluate_run, is what this test pays for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(Path(gguf).parent, gguf_file=Path(gguf).name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    peft = apply_lora(model, cfg)
    peft.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.02) if "lora_A" in name else torch.nn.init.zeros_(p)
    peft.save_pretrained(out)


def test_eval_smollm2_base_vs_zero_adapter(tmp_path, smollm2_gguf):
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
    _zero_adapter(smollm2_gguf, cfg, run / "adapter")

    metrics = evaluate_run(run, max_new_tokens=10, batch_size=4, device="cpu", progress=False)

    base = [json.loads(x) for x in (run / "eval" / "predictions-base-qa.jsonl").read_text().splitlines()]
    assert "Paris" in base[0]["predict"]  # the real model answers; the prompt went through its template
    for name, s in metrics["sets"].items():
        assert s["after"] == s["before"], name  # a zero adapter (B = 0) leaves the model unchanged
        assert s["loss_after"] == pytest.approx(s["loss_before"], rel=1e-6)
        assert 0 < s["loss_before"] < 10
    assert metrics["sets"]["qa"]["before"]["rouge-1"] > 20
    again = score_file(run / "eval" / "predictions-tuned-qa.jsonl")
    assert again == pytest.approx(metrics["sets"]["qa"]["after"], abs=1e-9)
