"""Bytes of a data file -> ``(line, record)`` pairs: UTF-8 text, JSON lines, JSON arrays, CSV.

Nothing here knows about formats (alpaca, ShareGPT, ...); `formats` turns the records into
examples. Every failure is a `DataError` naming the file and line -- never another exception,
whatever the bytes (tests/unit/test_fuzz_readers.py). Each reader runs in linear time.

Stricter than `json` and `csv` where their leniency would change the training text unseen: a
duplicate key or column keeps only one value, and NaN / Infinity / 1e400 would become "nan" / "inf".
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from itertools import zip_longest
from pathlib import Path
from typing import Any, Iterable

from ..errors import DataError


def read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {e.start}); convert the file to UTF-8", file=str(path), line=line) from None
    if not text.strip():
        raise DataError("file is empty", file=str(path))
    return text


def records_json(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    """Yield (line, record) from a JSON array or JSON lines file, with the line of each record.

    JSON lines end at "\n" only: `str.splitlines` also splits at U+2028, U+2029 and U+0085, which
    JSON strings may hold raw (json.dumps(..., ensure_ascii=False) writes them so).
    """
    if text.lstrip().startswith("["):
        yield from _records_json_array(path, text)
        return
    dec, nonfinite = _strict_decoder()
    for i, ln in enumerate(text.split("\n"), 1):
        ln = ln[:-1] if ln.endswith("\r") else ln  # CRLF files
        if not ln.strip():
            continue
        try:
            rec = dec.decode(ln)
        except _DuplicateKey as e:
            raise DataError(e.message, file=str(path), line=i, field=e.key) from None
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON line: {e.msg} (column {e.colno})", file=str(path), line=i) from None
        except (RecursionError, ValueError) as e:
            raise DataError(f"invalid JSON line: {json_limit(e)}", file=str(path), line=i) from None
        _refuse_nonfinite(path, i, rec, nonfinite)
        yield i, rec


def json_document(path: Path, text: str) -> Any:
    """A whole JSON document (dataset_info.json), refused on the same grounds as a record."""
    dec, nonfinite = _strict_decoder()
    try:
        doc = dec.decode(text)
    except _DuplicateKey as e:
        raise DataError(e.message, file=str(path), field=e.key) from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno) from None
    except (RecursionError, ValueError) as e:
        raise DataError(f"invalid JSON: {json_limit(e)}", file=str(path)) from None
    _refuse_nonfinite(path, None, doc, nonfinite)
    return doc


class _DuplicateKey(ValueError):
    """Raised from inside the decoder's object hook; the readers turn it into a DataError with a line."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key
        self.message = f"duplicate key {key!r} in one JSON object (JSON would keep only the last value); keep one"


def _strict_decoder() -> tuple[json.JSONDecoder, list[str]]:
    """A decoder that refuses duplicate keys and notes each non-finite number it reads.

    The non-finite numbers are noted rather than raised so that `_refuse_nonfinite` can name the field
    they sit in. The hooks make decoding about a third slower (a Python call per object and per float).
    """
    nonfinite: list[str] = []

    def pairs(kv: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(kv)
        if len(d) < len(kv):  # rare: only then look for the key
            seen: set[str] = set()
            for k, _ in kv:
                if k in seen:
                    raise _DuplicateKey(k)
                seen.add(k)
        return d

    def constant(s: str) -> float:  # NaN, Infinity, -Infinity: accepted by json, not JSON
        nonfinite.append(s)
        return float(s)

    def number(s: str) -> float:
        v = float(s)
        if math.isinf(v):  # 1e400 overflows
            nonfinite.append(s)
        return v

    return json.JSONDecoder(object_pairs_hook=pairs, parse_constant=constant, parse_float=number), nonfinite


def _refuse_nonfinite(path: Path, line: int | None, rec: Any, nonfinite: list[str]) -> None:
    if nonfinite:
        raise DataError(_nonfinite_message(nonfinite[0]), file=str(path), line=line, field=_nonfinite_field(rec))


def _nonfinite_message(literal: str) -> str:
    return f"non-finite number {literal} (not valid JSON; it would be trained on as the text {str(float(literal))!r})"


def _nonfinite_field(rec: Any) -> str | None:
    """Where the first non-finite number sits, e.g. ``history[0][1]``; iterative, so depth is no limit."""
    stack: list[tuple[str, Any]] = [("", rec)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return where or None
        if isinstance(v, dict):
            stack += reversed([(f"{where}.{k}" if where else k, x) for k, x in v.items()])
        elif isinstance(v, list):
            stack += reversed([(f"{where}[{i}]", x) for i, x in enumerate(v)])
    return None


_WS = re.compile(r"[ \t\r\n]*")


def _records_json_array(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    """One element at a time with `raw_decode`, in linear time.

    Line numbers are counted incrementally between consecutive positions: counting from the start
    of the text for every record made 100k records take minutes. Errors name the line and the
    record's 1-based position in the array, since a one-line file's line says nothing.
    """
    dec, nonfinite = _strict_decoder()
    n, pos = len(text), text.index("[") + 1
    line, line_pos = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, line_pos
        line, line_pos = line + text.count("\n", line_pos, p), p
        return line

    def fail(msg: str, p: int, index: int, field: str | None = None) -> DataError:
        return DataError(f"{msg} (record {index:,} of the array)", file=str(path), line=line_at(p), field=field)

    index = 0
    pos = _WS.match(text, pos).end()
    if pos < n and text[pos] == "]":
        return _check_after_array(path, text, pos + 1)
    while True:
        index += 1
        if pos >= n:
            raise DataError("unterminated JSON array (file truncated?)", file=str(path), line=line_at(n))
        start, start_line = pos, line_at(pos)
        try:
            obj, pos = dec.raw_decode(text, pos)
        except _DuplicateKey as e:
            raise fail(e.message, start, index, e.key) from None
        except json.JSONDecodeError as e:
            raise fail(f"invalid JSON: {e.msg}", e.pos, index) from None
        except (RecursionError, ValueError) as e:
            raise fail(f"invalid JSON: {json_limit(e)}", pos, index) from None
        if nonfinite:
            raise fail(_nonfinite_message(nonfinite[0]), start, index, _nonfinite_field(obj))
        yield start_line, obj
        pos = _WS.match(text, pos).end()
        if pos >= n:
            raise DataError("unterminated JSON array (file truncated?)", file=str(path), line=line_at(n))
        if text[pos] == "]":
            return _check_after_array(path, text, pos + 1)
        if text[pos] != ",":
            raise fail("invalid JSON: expected ',' or ']' after the record", pos, index)
        pos = _WS.match(text, pos + 1).end()
        if pos < n and text[pos] == "]":
            raise fail("invalid JSON: trailing comma before ']'", pos, index)


def _check_after_array(path: Path, text: str, pos: int) -> None:
    """Anything but whitespace after the closing ']' is a second document: refuse, not ignore."""
    end = _WS.match(text, pos).end()
    if end < len(text):
        raise DataError("invalid JSON: extra data after the closing ']'", file=str(path),
                        line=text.count("\n", 0, end) + 1)


def json_limit(e: Exception) -> str:
    """json's failures that are not JSONDecodeError: nesting deeper than the recursion limit, huge ints."""
    return "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]


def records_csv(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    """Yield (line, record) from a CSV file with a header row; a record's line is where it starts.

    csv's own line_num is where a record ends (a quoted field may hold newlines), so the start is taken
    before each read. Rows are made into dicts here, as csv.DictReader would, minus its silent cases:
    a duplicate column name (a dict keeps one of the columns) and a row longer than the header.
    """
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": csv itself splits \r, \n, \r\n
    start = 1
    try:
        header = next(reader, None)
        if not header:
            raise DataError("CSV has no header row", file=str(path), line=1)
        seen: set[str] = set()
        for name in header:
            if name.strip() and name in seen:  # blank names (trailing commas) name nothing read
                raise DataError("duplicate column name in the header (a record would keep only one of the "
                                "columns)", file=str(path), line=1, field=name)
            seen.add(name)
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                return
            if not row:  # a blank line
                continue
            if len(row) > len(header):
                raise DataError("row has more fields than the header", file=str(path), line=start)
            yield start, dict(zip_longest(header, row))  # missing trailing fields are None, as in DictReader
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", file=str(path), line=start) from None
