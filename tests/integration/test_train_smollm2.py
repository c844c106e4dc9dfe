"""End to end on the real SmolLM2-135M-Instruct: a short fine-tune must learn and change answers."""
import json

import pytest

from conftest import shared

pytestmark = pytest.mark.integration


def test_smollm2_learns_bitext_and_adapter_changes_greedy_output(tmp_path, smollm2_gguf, gguf_loaded_once):
    import lorafit

    csv_path = shared("domain/bitext-support-en/Bitext_Sample_Customer_Support_Training_Dataset.csv")
    out = tmp_path / "run"
    res = lorafit.train({"model": smollm2_gguf, "data": [str(csv_path)], "max_samples": 40, "val_size": 8,
                         "max_length": 96, "max_steps": 8, "learning_rate": 1e-3, "eval_steps": 8,
                         "logging_steps": 4, "save_steps": 100, "output_dir": str(out)}, progress=False)
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    ev = [r["eval_loss"] for r in recs if r["type"] == "eval"]
    assert ev[-1] < ev[0]  # validation loss falls on real data
    assert all(r["tokens_per_s"] > 0 for r in recs if r["type"] == "train")
    prompt = "I want to cancel my order, how do I do that?"
    base = lorafit.generate(res.run_dir, prompt, max_new_tokens=24, base_only=True)
    tuned = lorafit.generate(res.run_dir, prompt, max_new_tokens=24)
    assert base and tuned and base != tuned
