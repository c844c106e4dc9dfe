"""Bytes of a data file -> ``(line, record)`` pairs: UTF-8 text, JSON lines, JSON arrays, CSV.

Nothing here knows about formats (alpaca, ShareGPT, ...); `formats` turns the records into
examples. Every failure is a `DataError` naming the file and line -- never another exception,
whatever the bytes (tests/unit/test_fuzz_readers.py). Each reader runs in linear time.
"""
from __future__ import annotations

import csv
import io
import json
import re
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
    """Yield (line, record) from a JSON array or JSON lines file, with the line of each record."""
    if text.lstrip().startswith("["):
        yield from _records_json_array(path, text)
        return
    for i, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        try:
            yield i, json.loads(ln)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON line: {e.msg} (column {e.colno})", file=str(path), line=i) from None
        except (RecursionError, ValueError) as e:
            raise DataError(f"invalid JSON line: {json_limit(e)}", file=str(path), line=i) from None


_WS = re.compile(r"[ \t\r\n]*")


def _records_json_array(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    """One element at a time with `raw_decode`, in linear time.

    Line numbers are counted incrementally between consecutive positions: counting from the start
    of the text for every record made 100k records take minutes. Errors name the line and the
    record's 1-based position in the array, since a one-line file's line says nothing.
    """
    dec = json.JSONDecoder()
    n, pos = len(text), text.index("[") + 1
    line, line_pos = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, line_pos
        line, line_pos = line + text.count("\n", line_pos, p), p
        return line

    def fail(msg: str, p: int, index: int) -> DataError:
        return DataError(f"{msg} (record {index:,} of the array)", file=str(path), line=line_at(p))

    index = 0
    pos = _WS.match(text, pos).end()
    if pos < n and text[pos] == "]":
        return _check_after_array(path, text, pos + 1)
    while True:
        index += 1
        if pos >= n:
            raise DataError("unterminated JSON array (file truncated?)", file=str(path), line=line_at(n))
        start_line = line_at(pos)
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(f"invalid JSON: {e.msg}", e.pos, index) from None
        except (RecursionError, ValueError) as e:
            raise fail(f"invalid JSON: {json_limit(e)}", pos, index) from None
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
    reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="": csv itself splits \r, \n, \r\n
    try:
        if not reader.fieldnames:
            raise DataError("CSV has no header row", file=str(path), line=1)
        for row in reader:
            if None in row:
                raise DataError("row has more fields than the header", file=str(path), line=reader.line_num)
            yield reader.line_num, row
    except csv.Error as e:  # DictReader.line_num is only updated after a good row: ask its reader
        raise DataError(f"malformed CSV: {e}", file=str(path), line=reader.reader.line_num) from None
