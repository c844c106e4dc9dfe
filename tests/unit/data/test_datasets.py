"""A run's datasets (`data/datasets.py`): split, mix and augmentation, the same for the same seed."""
import json
import random

from lorafit.config import load_config
from lorafit.data import Example, augment_example, build_datasets


def test_build_datasets_split_mix_augment_deterministic(tmp_path):
    rows = [{"instruction": f"question number {i} about things", "output": f"answer {i}"} for i in range(50)]
    gen = [{"instruction": f"general {i}", "output": f"g{i}"} for i in range(100)]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "g.json").write_text(json.dumps(gen), encoding="utf-8")
    cfg = load_config(None, {"model": "org/m", "data": [str(tmp_path / "d.json")], "val_size": 0.2,
                             "general_data": [str(tmp_path / "g.json")], "general_ratio": 0.2,
                             "augment": ["swap_adjacent"]})
    a, b = build_datasets(cfg), build_datasets(cfg)
    assert [e.messages for e in a.train] == [e.messages for e in b.train]
    assert len(a.val["val"]) == 10
    assert a.n_general == 20  # 80 domain (40 + 40 augmented) -> 20% general = 20
    val_prompts = {e.messages[-2]["content"] for e in a.val["val"]}
    originals = {e.messages[-2]["content"] for e in a.train if e.label.startswith("answer")}
    assert not val_prompts & originals  # no leakage of validation examples into training


def test_augmentation_only_touches_the_prompt():
    ex = Example([{"role": "user", "content": "one two three four five six"}, {"role": "assistant", "content": "keep me"}])
    aug = augment_example(ex, ["word_dropout", "swap_adjacent", "prompt_variants"], random.Random(1))
    assert aug.label == "keep me" and aug.messages[0]["content"] != ex.messages[0]["content"]
