"""`lorafit eval --checkpoints --select`: the selection rule on a synthetic table, and one end-to-end
sweep over a tiny model's real checkpoints, with the exported adapter loaded back through PEFT."""
from __future__ import annotations

import json

import pytest
import torch

from lorafit.config import load_config
from lorafit.demoset import write_demo_data
from lorafit.evaluation.checkpoints import checkpoints_table_md, select


def _table(rows, base_general=2.0, budget=0.02):
    return {"target_set": "seen", "general_set": "general", "forgetting_budget": budget,
            "base": {"name": "base", "kind": "base", "step": 0,
                     "sets": {"seen": {"rouge-l": 10.0}, "general": {"loss": base_general}}},
            "checkpoints": [{"name": n, "kind": "checkpoint" if n.startswith("step") else n, "step": st,
                             "sets": {"seen": {"rouge-l": rl}, "general": {"loss": gl}}} for n, st, rl, gl in rows]}


def test_select_best_rouge_within_the_forgetting_budget():
    # step-300 scores highest but its general loss is +5%: over the 2% budget. step-200 (+1.5%) wins
    # over step-100 (+0.5%, lower ROUGE-L); final equals step-300.
    t = _table([("step-100", 100, 20.0, 2.01), ("step-200", 200, 25.0, 2.03), ("step-300", 300, 30.0, 2.10),
                ("final", 300, 30.0, 2.10)])
    choice = select(t)
    assert choice["name"] == "step-200" and choice["step"] == 200
    assert "within +2% of the base model's 2.000" in choice["reason"]
    assert "over budget: step-300, final" in choice["reason"] and "step-300 scores higher (30.00)" in choice["reason"]
    assert t["checkpoints"][1]["general_loss_rise"] == pytest.approx(0.015)
    # a looser budget lets the best one in; a tie in ROUGE-L goes to the earlier step
    assert select(t, budget=0.06)["name"] == "step-300"
    # nothing within budget: no choice, and the reason says what to do
    none = select(_table([("step-100", 100, 20.0, 2.5)]))
    assert none["name"] is None and "+25.0%" in none["reason"] and "forgetting_budget" in none["reason"]
    # no general set: the best ROUGE-L, and the reason says forgetting was not checked
    t2 = _table([("step-100", 100, 20.0, 2.0), ("step-200", 200, 22.0, 2.0)])
    t2["general_set"] = None
    assert select(t2)["name"] == "step-200" and "not checked" in select(t2)["reason"]
    t["selected"] = choice
    md = checkpoints_table_md(t)
    assert "| step-200 | 200 | 25.00 |" in md and "+1.5%" in md and "**Selected:** step-200" in md


def test_checkpoints_end_to_end_on_tiny_model(tiny_model_dir, tmp_path):
    import lorafit
    from lorafit.model import load_adapter, load_model

    train, val = write_demo_data(tmp_path / "data")
    cfg = load_config(None, {"model": tiny_model_dir, "data": [str(train)],
                             "val_data": {"support": str(val)}, "general_eval": str(val),
                             "output_dir": str(tmp_path / "run"), "max_steps": 6, "max_length": 64,
                             "eval_steps": 3, "logging_steps": 2, "save_steps": 2, "save_total_limit": 3,
                             "learning_rate": 5e-3, "lora_dropout": 0.0, "max_new_tokens": 4,
                             "max_eval_samples": 4, "forgetting_budget": 10.0})
    run = lorafit.train(cfg, progress=False, plot=False).run_dir
    table = lorafit.evaluate(run, checkpoints=True, select=True, progress=False)
    names = [r["name"] for r in table["checkpoints"]]
    assert names[:2] == ["step-2", "step-4"] and names[-1] == "final" and table["checkpoints"][-1]["step"] == 6
    # the candidates really differ (weights were swapped in), and the base is the base
    losses = [r["sets"]["support"]["loss"] for r in table["checkpoints"]]
    assert len(set(round(x, 6) for x in losses)) == len(losses)
    assert all(x < table["base"]["sets"]["support"]["loss"] for x in losses)
    assert table["target_set"] == "support" and table["general_set"] == "general"
    assert table["base"]["sets"]["general"]["loss"] > 0
    sel = table["selected"]
    assert sel["name"] in names and (run / "selected-adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "eval" / "checkpoints.json").read_text())["selected"]["name"] == sel["name"]
    assert (run / "eval" / "checkpoints.png").stat().st_size > 1000
    # the exported adapter loads with PEFT and holds the selected candidate's weights
    from safetensors.torch import load_file

    model = load_adapter(load_model(tiny_model_dir, device="cpu"), run / "selected-adapter")
    want = load_file(str(run / "checkpoints" / f"step-{sel['step']}" / "trainable.safetensors")) \
        if sel["kind"] == "checkpoint" else None
    params = dict(model.named_parameters())
    if want is not None:
        for k, v in want.items():
            assert torch.equal(params[k], v), k
    # --select alone reuses the table
    again = lorafit.evaluate(run, select=True)
    assert again["checkpoints"] == table["checkpoints"] and again["selected"]["name"] == sel["name"]
