"""Records in every supported format become the same chat messages (`data/formats.py`); bad ones
name file, line and field."""
import json

import pytest

from lorafit.data import Example, group_references, read_examples
from lorafit.errors import DataError


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


def test_group_references():
    exs = [Example([{"role": "user", "content": "mr1"}, {"role": "assistant", "content": r}]) for r in ("a", "b")]
    (g,) = group_references(exs)
    assert g.references == ["a", "b"]
