"""Reading a file's bytes (`data/readers.py`): UTF-8 and empty files are refused with the file named.
(Arbitrary bytes: tests/unit/test_fuzz_readers.py.)"""
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
