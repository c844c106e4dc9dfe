"""Reading a file's bytes (`data/readers.py`): UTF-8 and empty files are refused with the file named.
(Arbitrary bytes: tests/unit/test_fuzz_readers.py.)"""
import json
import re

import pytest

from lorafit.data import read_examples
from lorafit.errors import DataError


def test_non_utf8_and_empty(tmp_path):
    p = tmp_path / "l1.json"
    p.write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_examples(p)
    with pytest.raises(DataError, match="empty"):
        empty = tmp_path / "e.json"
        empty.write_text("  \n", encoding="utf-8")
        read_examples(empty)


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw; str.splitlines splits at them."""
    p = tmp_path / "u.jsonl"
    rows = [{"instruction": f"a{c}b", "output": "x"} for c in ("\u2028", "\u2029", "\x85")]
    p.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n\n"
                 + '{"instruction": "c", "output": ""}\n', encoding="utf-8", newline="")
    with pytest.raises(DataError, match="empty field") as e:
        read_examples(p)
    assert (e.value.line, e.value.field) == (5, "output")  # later lines are not shifted
    p.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8", newline="")
    exs = read_examples(p)
    assert [ex.messages[0]["content"] for ex in exs] == [r["instruction"] for r in rows]
    assert [ex.line for ex in exs] == [1, 2, 3]


def test_csv_line_is_where_a_record_starts(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text('question,answer\r\n"Line one\nline two","Ans\nand more"\r\n\r\n"q2","a2"\r\n"multi\nline","x"\n'
                 '"q4\n\n",\n', encoding="utf-8", newline="")
    with pytest.raises(DataError, match="empty field") as e:
        read_examples(p)
    assert (e.value.line, e.value.field) == (9, "answer")  # not 11, where it ends
    p.write_text('question,answer\r\n"Line one\nline two","Ans\nand more"\r\n\r\n"q2","a2"\r\n', encoding="utf-8",
                 newline="")
    assert [ex.line for ex in read_examples(p)] == [2, 6]
    for bad, fragment in [(f'"big\n{"x" * 200_000}",a\n', "malformed CSV"), ('"q\n",a,extra\n', "more fields")]:
        p.write_text("question,answer\nq,a\n" + bad, encoding="utf-8")
        with pytest.raises(DataError, match=fragment) as e:
            read_examples(p)
        assert e.value.line == 3


@pytest.mark.parametrize("text,line,field,literal", [
    ('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": NaN}\n', 2, "output", "NaN"),
    ('{"instruction": "q", "output": Infinity}\n', 1, "output", "Infinity"),
    ('{"instruction": "q", "output": "a", "history": [["x", -Infinity]]}\n', 1, "history[0][1]", "-Infinity"),
    ('{"conversations": [{"from": "human", "value": 1e400}]}\n', 1, "conversations[0].value", "1e400"),
    ('{"instruction": "q", "output": "a", "score": NaN}\n', 1, "score", "NaN"),  # not JSON, wherever it is
    ('[{"instruction": "q", "output": "a"},\n {"instruction": "q",\n  "output": -1e999}]', 2, "output", "-1e999"),
])
def test_non_finite_numbers_refused(tmp_path, text, line, field, literal):
    """Python's json reads NaN and Infinity (not JSON) and overflows 1e400 to inf: they became the text 'nan'."""
    p = tmp_path / ("n.json" if text.startswith("[") else "n.jsonl")
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"non-finite number {re.escape(literal)}") as e:
        read_examples(p)
    assert (e.value.file, e.value.line, e.value.field) == (str(p), line, field)


@pytest.mark.parametrize("name,text,line,field", [
    ("d.jsonl", '{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "a", "output": "b"}\n', 2, "output"),
    ("d.json", '[{"instruction": "q", "output": "a"},\n {"instruction": "q", "output": "a",\n  "output": "b"}]', 2,
     "output"),
    ("d.jsonl", '{"conversations": [{"from": "human", "from": "gpt", "value": "v"}]}\n', 1, "from"),
    ("d.csv", "instruction,output,output\nq,first,second\n", 1, "output"),
])
def test_duplicate_keys_refused(tmp_path, name, text, line, field):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match="duplicate") as e:
        read_examples(p)
    assert (e.value.file, e.value.line, e.value.field) == (str(p), line, field)


def test_csv_blank_header_names_may_repeat(tmp_path):
    """Trailing commas (spreadsheet exports) give several unnamed columns; they name nothing that is read."""
    p = tmp_path / "c.csv"
    p.write_text("instruction,output,,\nq,a,,\n", encoding="utf-8")
    assert read_examples(p)[0].label == "a"
