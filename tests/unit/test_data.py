import json

import pytest

from lorafit.data import (CHATML_TEMPLATE, augment_example, build_datasets, encode, ensure_template, group_references,
                          read_examples)
from lorafit.errors import DataError
from lorafit.config import load_config


def write(p, text):
    p.write_text(text, encoding="utf-8")
    return p


def test_alpaca_with_system_and_history(tmp_path):
    p = write(tmp_path / "a.json", json.dumps([{"instruction": "Q2", "input": "ctx", "output": "A2", "system": "S",
                                                "history": [["Q1", "A1"]]}]))
    (ex,) = read_examples(p)
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ex.messages[3]["content"] == "Q2\nctx" and ex.label == "A2"


def test_sharegpt_both_shapes_and_jsonl_lines(tmp_path):
    p = write(tmp_path / "s.jsonl",
              json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) + "\n\n"
              + json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    a, b = read_examples(p)
    assert a.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert b.label == "a" and b.line == 3


def test_csv_with_column_mapping(tmp_path):
    p = write(tmp_path / "c.csv", "q,a,extra\nhello,world,x\n")
    (ex,) = read_examples(p, columns={"instruction": "q", "output": "a"})
    assert ex.messages[-2:] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]


def test_dolly_text_format(tmp_path):
    p = write(tmp_path / "d.jsonl", json.dumps({"text": "### Human: Why? ### Assistant: Because."}) + "\n")
    assert read_examples(p)[0].messages[-1]["content"] == "Because."


def test_dataset_info(tmp_path):
    write(tmp_path / "d.json", json.dumps([{"q": "x", "r": "y"}]))
    write(tmp_path / "dataset_info.json", json.dumps({"mine": {"file_name": "d.json", "columns": {"prompt": "q", "response": "r"}}}))
    (ex,) = read_examples(f"{tmp_path}/dataset_info.json#mine")
    assert ex.label == "y"


@pytest.mark.parametrize("content,line,field", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n', 2, "output"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n', 2, None),
    ('{"instruction": 3.5, "output": ["x"]}\n', 1, "output"),
    ('[{"instruction": "a", "output": "b"},\n {"output": "c"}]', 2, "instruction"),
])
def test_bad_records_name_file_line_field(tmp_path, content, line, field):
    p = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError) as e:
        read_examples(p)
    assert e.value.file == str(p) and e.value.line == line and e.value.field == field


def test_non_utf8_and_empty(tmp_path):
    p = tmp_path / "l1.json"
    p.write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_examples(p)
    with pytest.raises(DataError, match="empty"):
        read_examples(write(tmp_path / "e.json", "  \n"))


def test_group_references():
    from lorafit.data import Example

    exs = [Example([{"role": "user", "content": "mr1"}, {"role": "assistant", "content": r}]) for r in ("a", "b")]
    (g,) = group_references(exs)
    assert g.references == ["a", "b"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from lorafit.model import load_tokenizer

    return ensure_template(load_tokenizer(tiny_model_dir))


def test_loss_mask_covers_exactly_the_answers(tok):
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A one"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A two"}]
    ids, labels, trunc = encode(tok, msgs, max_length=1024)
    assert not trunc and len(ids) == len(labels)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) == full  # segment-wise tokenisation reproduces the template exactly
    supervised = tok.decode([i for i, l in zip(ids, labels) if l != -100])
    assert "A one" in supervised and "A two" in supervised
    assert "Q1" not in supervised and "assistant" not in supervised and "system" not in supervised
    ids2, labels2, _ = encode(tok, msgs, max_length=1024, train_on_prompt=True)
    assert labels2 == ids2


def test_truncation_keeps_answer_start_and_prompt_end(tok):
    msgs = [{"role": "user", "content": "word " * 300 + "QUESTION?"}, {"role": "assistant", "content": "ANSWER " * 100}]
    ids, labels, trunc = encode(tok, msgs, max_length=64)
    assert trunc and len(ids) == 64
    text = tok.decode(ids)
    assert "QUESTION?" in text and "ANSWER" in text
    assert sum(l != -100 for l in labels) == 32  # response budget max(64 // 2, 64 - len(prompt))


def test_chatml_fallback(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    ensure_template(t)
    assert t.chat_template == CHATML_TEMPLATE


def test_build_datasets_split_mix_augment_deterministic(tmp_path):
    rows = [{"instruction": f"question number {i} about things", "output": f"answer {i}"} for i in range(50)]
    gen = [{"instruction": f"general {i}", "output": f"g{i}"} for i in range(100)]
    write(tmp_path / "d.json", json.dumps(rows))
    write(tmp_path / "g.json", json.dumps(gen))
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
    import random

    from lorafit.data import Example

    ex = Example([{"role": "user", "content": "one two three four five six"}, {"role": "assistant", "content": "keep me"}])
    aug = augment_example(ex, ["word_dropout", "swap_adjacent", "prompt_variants"], random.Random(1))
    assert aug.label == "keep me" and aug.messages[0]["content"] != ex.messages[0]["content"]
