"""Batched generation agrees with one-at-a-time generation; `evaluate_run` writes the run's eval files."""
from __future__ import annotations

import json

import pytest
import torch

from lorafit.config import load_config, save_config
from lorafit.data import Example, ensure_template, render_prompt
from lorafit.errors import RunError
from lorafit.evaluation import KEYS, evaluate_run, generate_batched, generate_sequential, reference_loss
from lorafit.model import apply_lora, load_model, load_tokenizer

QUESTIONS = ["hi", "What is the capital of France?", "Explain LoRA in one long sentence with many words, please.",
             "2+2?", "你好，今天天气怎么样？", "Tell me a joke", "hi there"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return ensure_template(load_tokenizer(tiny_model_dir))


@pytest.fixture(scope="module")
def chaotic_model(tiny_model_dir):
    """The tiny model with large random weights. At the default init (std 0.02) with tied embeddings
    it answers every prompt with the same newline token, which would let a padding bug pass; with
    std 0.3 each prompt gets its own answer, so any leak of padding into the result shows."""
    model = load_model(tiny_model_dir, device="cpu", dtype="float32").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=g)
    return model


def test_batched_equals_one_at_a_time(chaotic_model, tok):
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    batched = generate_batched(chaotic_model, tok, prompts, max_new_tokens=12, batch_size=3, progress=False)
    reference = generate_sequential(chaotic_model, tok, prompts, max_new_tokens=12, progress=False)
    assert batched == reference
    assert len(set(batched)) >= 5, "answers should differ per prompt, else the test proves nothing"


def _write_json(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, tiny_model_dir):
    """A run folder as `lorafit train` leaves it: config.yaml and a (non-zero) adapter."""
    d = tmp_path_factory.mktemp("eval-run")
    train = _write_json(d / "train.json", [{"instruction": f"question {i}?", "output": f"answer {i}."} for i in range(6)])
    dom = _write_json(d / "dom.json", [  # E2E-like: one prompt, two references
        {"instruction": "name[The Eagle], food[Chinese]", "output": "The Eagle serves Chinese food."},
        {"instruction": "name[The Eagle], food[Chinese]", "output": "The Eagle is a Chinese restaurant."},
        {"instruction": "感冒了怎么办？", "output": "多喝水，注意休息。"},
        {"instruction": "What is 2+2?", "output": "4"}])
    general = d / "general.jsonl"
    general.write_text("\n".join(json.dumps({"text": f"### Human: Q{i}? ### Assistant: A{i}."}) for i in range(3)))
    run = d / "run"
    run.mkdir()
    cfg = load_config(overrides={"model": tiny_model_dir, "data": [train], "val_size": 2, "val_data": {"dom": dom},
                                 "general_eval": str(general), "output_dir": str(run), "max_new_tokens": 6,
                                 "eval_batch_size": 2, "lora_rank": 4})
    save_config(cfg, run / "config.yaml")
    peft = apply_lora(load_model(tiny_model_dir, device="cpu"), cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero (tuned == base); make the adapter change the model
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.save_pretrained(run / "adapter")
    return run, cfg


def test_evaluate_run_writes_predictions_and_metrics(fake_run, tok):
    run, cfg = fake_run
    metrics = evaluate_run(run, progress=False)
    assert metrics == json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["mode"] == "llamafactory"
    assert list(metrics["sets"]) == ["val", "dom", "general"]
    for name, s in metrics["sets"].items():
        assert set(s) == {"lang", "n", "before", "after", "delta", "delta_ci95", "p_value", "loss_before", "loss_after",
                          "loss_delta", "loss_delta_ci95", "loss_p_value", "health", "flips"}
        assert s["lang"] == ("zh" if name == "dom" else "en")  # dom's one Chinese answer is enough
        for part in ("before", "after", "delta"):
            assert set(s[part]) == set(KEYS)
        assert s["delta"] == {k: s["after"][k] - s["before"][k] for k in KEYS}
        assert isinstance(s["loss_before"], float) and isinstance(s["loss_after"], float)
        assert s["loss_before"] != s["loss_after"]  # the adapter is non-zero
        for model in ("base", "tuned"):
            rows = [json.loads(x) for x in (run / "eval" / f"predictions-{model}-{name}.jsonl").read_text().splitlines()]
            assert len(rows) == s["n"]
            assert all(set(r) == {"prompt", "predict", "label", "no_eos", "loss_sum", "loss_tokens"}
                       and r["prompt"].endswith("assistant\n") for r in rows)
    assert metrics["sets"]["dom"]["n"] == 3  # the two references of one prompt were grouped
    dom_rows = [json.loads(x) for x in (run / "eval" / "predictions-base-dom.jsonl").read_text().splitlines()]
    assert dom_rows[0]["label"] == ["The Eagle serves Chinese food.", "The Eagle is a Chinese restaurant."]
    assert dom_rows[1]["label"] == "多喝水，注意休息。"
    md = (run / "eval" / "metrics.md").read_text(encoding="utf-8")
    assert "| val | en | 2 | before |" in md and "general (forgetting)" in md

    # "before" really is the base model: disable_adapter() must equal a plain load of the base.
    base = load_model(cfg.model, device="cpu").eval()
    general = [Example([{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}])
               for i in range(3)]
    plain = reference_loss(base, tok, general, max_length=cfg.max_length)
    assert metrics["sets"]["general"]["loss_before"] == pytest.approx(plain, rel=1e-5)


def test_evaluate_run_options_and_errors(fake_run, tmp_path):
    run, _ = fake_run
    metrics = evaluate_run(run, sets=["dom"], max_samples=1, mode="standard", max_new_tokens=2, progress=False)
    assert metrics["mode"] == "standard" and list(metrics["sets"]) == ["dom"] and metrics["sets"]["dom"]["n"] == 1
    with pytest.raises(RunError, match="no validation set named 'nope'"):
        evaluate_run(run, sets=["nope"], progress=False)
    with pytest.raises(RunError, match="not a run folder"):
        evaluate_run(tmp_path, progress=False)


def test_max_eval_samples_caps_prompts_not_reference_rows(fake_run):
    # 'dom' has 4 rows but 3 prompts (the first has two references): a cap of 2 must give 2 prompts,
    # the first with both references, not the 2 rows of the first prompt.
    from lorafit.config import load_config
    from lorafit.evaluation.run import _eval_sets

    run, _ = fake_run
    cfg = load_config(run / "config.yaml", {"max_eval_samples": 2})
    sets = _eval_sets(cfg, run / "config.yaml", ["dom"], None)
    assert len(sets["dom"]) == 2
    assert sets["dom"][0].references == ["The Eagle serves Chinese food.", "The Eagle is a Chinese restaurant."]


def test_an_answer_cut_inside_a_character_has_no_replacement_character(tok):
    """max_new_tokens can end generation between the byte tokens of one Chinese character."""
    from lorafit.evaluation.generate import decoded_text

    ids = tok("北京是一个美丽的城市", add_special_tokens=False)["input_ids"]
    cuts = [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd") and tok.decode(ids[:n]).strip("\ufffd")]
    assert cuts, "SmolLM2's byte-level tokenizer splits some character after the first over several tokens"
    text = decoded_text(tok.decode(ids[:cuts[0]]))
    assert text and "\ufffd" not in text and "北京是一个美丽的城市".startswith(text)
    assert decoded_text("  答案 \ufffd\ufffd ") == "答案" and decoded_text("ok") == "ok"
