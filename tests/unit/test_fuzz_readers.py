"""Property-based fuzzing of the data readers: whatever the bytes, `lorafit.data.read_examples`
either returns well-formed Examples or raises `DataError` -- never another exception, which the CLI
would show as a traceback instead of "file, line, field: what is wrong".

Bounded (150 derandomized examples per test, no deadline): the module runs in about 10 s on two cores.
"""
from __future__ import annotations

import atexit
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.config import FORMATS
from lorafit.data import read_examples
from lorafit.errors import DataError

# CI: 150 fixed examples per test. A longer random hunt: LORAFIT_FUZZ_EXAMPLES=5000 pytest this file.
_HUNT = int(os.environ.get("LORAFIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_HUNT or 150, deadline=None, derandomize=not _HUNT, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_DIR = Path(tempfile.mkdtemp(prefix="lorafit-fuzz-"))  # hypothesis and tmp_path do not mix; removed at exit
atexit.register(shutil.rmtree, _DIR, True)

# Names the readers look for, so generated records hit the interesting branches, not only "missing".
KEYS = ["instruction", "input", "output", "prompt", "question", "query", "response", "answer", "system",
        "history", "conversations", "messages", "text", "from", "value", "role", "content", "mr", "ref"]
ROLES = ["human", "gpt", "user", "assistant", "system", "model", "bot", "tool", "observation", "narrator"]

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | st.sampled_from(ROLES + ["### Human: q ### Assistant: a", "", " "]))
json_values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)),
    max_leaves=25,
)
turn = st.dictionaries(st.sampled_from(["from", "value", "role", "content"]), scalars | json_values, max_size=3)
record = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6),
    st.fixed_dictionaries({"conversations": st.lists(turn | json_values, max_size=4)}),
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4)}, optional={"system": scalars}),
    st.fixed_dictionaries({"instruction": scalars, "output": scalars},
                          optional={"input": scalars, "system": scalars, "history": json_values}),
    json_values,
)
columns = st.none() | st.dictionaries(st.sampled_from(["instruction", "input", "output", "system", "history",
                                                        "messages", "conversations", "text"]),
                                      st.sampled_from(KEYS), max_size=3)

_counter = iter(range(10**9))


def _write(suffix: str, data: bytes) -> Path:
    p = _DIR / f"f{next(_counter)}{suffix}"
    p.write_bytes(data)
    return p


def _read(path: Path, fmt: str = "auto", cols: dict | None = None) -> None:
    try:
        out = read_examples(path, fmt, cols)
    except DataError as e:
        assert e.file is not None  # every data error names its file
        return
    finally:
        path.unlink()
    # Success: every example is a conversation ending with an encodable assistant answer.
    assert out
    for ex in out:
        assert ex.messages and ex.messages[-1]["role"] == "assistant"
        for m in ex.messages:
            assert m["role"] in ("system", "user", "assistant")
            assert isinstance(m["content"], str)
            m["content"].encode("utf-8")


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".json", ".jsonl", ".csv"]))
def test_arbitrary_bytes(data, suffix):
    _read(_write(suffix, data))


@FUZZ
@given(prefix=st.sampled_from([b"", b"\xef\xbb\xbf", b"[", b"{", b"instruction,output\n"]),
       data=st.text(max_size=300), suffix=st.sampled_from([".json", ".jsonl", ".csv"]))
def test_arbitrary_text(prefix, data, suffix):
    _read(_write(suffix, prefix + data.encode("utf-8", "surrogatepass")))


@FUZZ
@given(records=st.lists(record, max_size=5), as_array=st.booleans(), fmt=st.sampled_from(FORMATS), cols=columns)
def test_arbitrary_json_structures(records, as_array, fmt, cols):
    if as_array:
        text = json.dumps(records, indent=1)
    else:
        text = "\n".join(json.dumps(r) for r in records)
    _read(_write(".json" if as_array else ".jsonl", text.encode("utf-8", "surrogatepass")), fmt, cols)


@FUZZ
@given(header=st.lists(st.sampled_from(KEYS) | st.text(max_size=6), max_size=4),
       rows=st.lists(st.lists(st.text(max_size=12) | st.sampled_from(["", " ", "\"", "\n", ","]), max_size=5),
                     max_size=5),
       fmt=st.sampled_from(FORMATS), cols=columns)
def test_arbitrary_csv(header, rows, fmt, cols):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    _read(_write(".csv", buf.getvalue().encode("utf-8", "surrogatepass")), fmt, cols)


@FUZZ
@given(info=json_values | st.dictionaries(st.text(max_size=4), json_values | st.fixed_dictionaries(
    {"file_name": scalars}, optional={"columns": json_values, "tags": json_values, "formatting": scalars}), max_size=3),
    name=st.text(max_size=4))
def test_arbitrary_dataset_info(info, name):
    d = _DIR / f"info{next(_counter)}"
    d.mkdir()
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8", errors="surrogatepass")
    (d / "x.json").write_text('[{"instruction": "q", "output": "a"}]', encoding="utf-8")
    try:
        read_examples(f"{d}/dataset_info.json#{name}")
    except DataError:
        pass
