"""`lorafit eval --model --adapter --val --out` on an adapter trained by plain PEFT code (not lorafit),
on the tiny random Llama; an adapter for another base, a missing file or a bad argument is one line,
exit 2, and OUT untouched."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafit.cli import main

VAL = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
       {"instruction": "Say hello.", "input": "", "output": "Hello!"},
       {"instruction": "2+2?", "input": "", "output": "4"}]
GENERAL = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
           {"instruction": "Name a fruit.", "input": "", "output": "Apple."}]


def _peft_adapter(model_dir: str, out: Path, seed: int = 0) -> Path:
    """What a user of PEFT writes: get_peft_model, a few AdamW steps on answers, save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tok([f"{ex['instruction']} {ex['output']}" for ex in VAL], return_tensors="pt", padding=True)
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


def _files(tmp_path: Path) -> tuple[Path, Path]:
    val, gen = tmp_path / "faq.json", tmp_path / "general.jsonl"
    val.write_text(json.dumps(VAL), encoding="utf-8")
    gen.write_text("".join(json.dumps(r) + "\n" for r in GENERAL), encoding="utf-8")
    return val, gen


def test_eval_of_a_plain_peft_adapter(tmp_path, tiny_model_dir, capsys):
    adapter = _peft_adapter(tiny_model_dir, tmp_path / "saves" / "lora")
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "config.yaml").exists()
    val, gen = _files(tmp_path)
    out = tmp_path / "saves" / "eval"
    rc = main(["eval", "--model", tiny_model_dir, "--adapter", str(adapter), "--val", f"faq={val}",
               "--general", str(gen), "--out", str(out), "--max-new-tokens", "4", "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert rc == 0 and "faq" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sets"]) == {"faq", "general"} and metrics["adapter"] == str(adapter.resolve())
    faq = metrics["sets"]["faq"]
    assert faq["n"] == 3 and faq["loss_before"] != faq["loss_after"]   # the adapter changed the model
    for which in ("base", "tuned"):
        rows = (out / f"predictions-{which}-faq.jsonl").read_text().splitlines()
        assert len(rows) == 3 and {"prompt", "predict", "label"} <= set(json.loads(rows[0]))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".eval.")]   # staging folder gone


def test_adapter_for_another_base_is_one_line(tmp_path, tiny_model_dir, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 48, "num_attention_heads": 4})).save_pretrained(other)
    for f in Path(tiny_model_dir).glob("*token*"):
        (other / f.name).write_bytes(f.read_bytes())
    adapter = _peft_adapter(str(other), tmp_path / "lora-other")
    val, _ = _files(tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()   # the test's own save_pretrained progress bars
    rc = main(["eval", "--model", tiny_model_dir, "--adapter", str(adapter), "--val", f"faq={val}", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "lorafit: error" in ln]   # (transformers' loading bar aside)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert "another base model" in errors[0] and "q_proj" in errors[0] and "in_features 32" in errors[0]
    assert not out.exists()


def test_bad_eval_arguments_are_one_line(tmp_path, capsys):
    val, _ = _files(tmp_path)
    fake = tmp_path / "adapter"
    fake.mkdir()
    cases = [
        (["--model", "m", "--adapter", str(fake), "--val", f"faq={val}", "--out", "o"], "adapter_config.json"),
        (["--model", "m", "--adapter", str(fake), "--val", "faq", "--out", "o"], "NAME=FILE"),
        (["--model", "m", "--adapter", str(fake), "--val", f"faq={val}"], "--out"),
        (["run", "--adapter", str(fake)], "not both"),
        ([], "give a run folder"),
    ]
    (fake / "adapter_config.json").write_text("{}")
    cases.append((["--model", "m", "--adapter", str(fake), "--val", f"faq={tmp_path / 'nope.json'}", "--out", "o"],
                  "nope.json"))
    for args, words in cases[1:]:
        rc = main(["eval", *args])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and err.count("\n") == 1, (args, err)
    (fake / "adapter_config.json").unlink()
    assert main(["eval", *cases[0][0]]) == 2 and cases[0][1] in capsys.readouterr().err
    assert not (Path.cwd() / "o").exists()


def test_eval_out_never_writes_into_a_folder_of_user_files(tmp_path, tiny_model_dir, capsys):
    """--out pointing at a folder of the user's files: exit 2 before the model loads, the folder untouched."""
    from lorafit.cli import main

    user = tmp_path / "mine"
    user.mkdir()
    (user / "metrics.json").write_text('{"my": "numbers"}')
    (user / "notes.txt").write_text("keep")
    val = tmp_path / "val.json"
    val.write_text('[{"instruction": "a", "output": "b"}]')
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")  # the folder check comes before anything is loaded
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    rc = main(["eval", "--model", tiny_model_dir, "--adapter", str(ad), "--val", f"v={val}", "--out", str(user)])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and str(user) in err
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before
