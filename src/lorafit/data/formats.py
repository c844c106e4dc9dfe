"""Records in any supported format -> `Example`s: chat messages ending with the answer (the label).

Formats: alpaca (with system and history), ShareGPT (`from`/`value` or `role`/`content`), Dolly-style
text, and LLaMA-Factory's dataset_info.json; `readers` supplies the (line, record) pairs. Errors name
file, line and field.

Field aliases (used when no ``columns`` mapping is given): instruction <- instruction | prompt |
question | query | mr; output <- output | response | answer | std_answer | ref.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .readers import json_limit, read_text, records_csv, records_json

ALIASES = {
    "instruction": ("instruction", "prompt", "question", "query", "mr"),
    "input": ("input",),
    "output": ("output", "response", "answer", "std_answer", "ref"),
    "system": ("system",),
    "history": ("history",),
}
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "model": "assistant", "bot": "assistant", "system": "system", "observation": "user",
            "function_call": "assistant", "tool": "user"}
_DOLLY = re.compile(r"^\s*### Human:\s*(?P<q>.*?)\s*### Assistant:\s*(?P<a>.*)$", re.S)


@dataclass
class Example:
    """One example in the one shape every format becomes; `source` and `line` say where it was read."""

    messages: list[dict[str, str]]
    source: str = ""
    line: int = 0
    references: list[str] = field(default_factory=list)  # extra references (e.g. E2E), label included

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1]

    @property
    def label(self) -> str:
        return self.messages[-1]["content"]


def _pick(rec: dict, key: str, columns: dict[str, str]) -> Any:
    if key in columns:
        return rec.get(columns[key])
    for alias in ALIASES.get(key, (key,)):
        if alias in rec:
            return rec[alias]
    return None


def _field_name(rec: dict, key: str, columns: dict[str, str]) -> str:
    if key in columns:
        return columns[key]
    return next((a for a in ALIASES.get(key, (key,)) if a in rec), key)


def _detect(rec: dict, columns: dict[str, str]) -> str:
    keys = set(rec)
    if "conversations" in columns or "messages" in columns or keys & {"conversations", "messages"}:
        return "sharegpt"
    if "text" in columns or (keys == {"text"} or ("text" in keys and _pick(rec, "output", columns) is None)):
        return "text"
    return "alpaca"


def _need_str(v: Any, path: Path, line: int, name: str, allow_empty: bool = False) -> str:
    if v is None:
        raise DataError("missing field", file=str(path), line=line, field=name)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise DataError(f"expected a string, got {type(v).__name__}", file=str(path), line=line, field=name)
    if not allow_empty and not v.strip():
        raise DataError("empty field", file=str(path), line=line, field=name)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": no tokenizer can encode it
        raise DataError(f"invalid text: unpaired surrogate {v[e.start]!r} at character {e.start}", file=str(path),
                        line=line, field=name) from None
    return v


def _alpaca(rec: dict, path: Path, line: int, columns: dict[str, str]) -> list[dict[str, str]]:
    f_ins, f_out = _field_name(rec, "instruction", columns), _field_name(rec, "output", columns)
    ins = _need_str(_pick(rec, "instruction", columns), path, line, f_ins)
    out = _need_str(_pick(rec, "output", columns), path, line, f_out)
    inp = _pick(rec, "input", columns)
    if inp is not None:
        inp = _need_str(inp, path, line, _field_name(rec, "input", columns), allow_empty=True)
    msgs: list[dict[str, str]] = []
    system = _pick(rec, "system", columns)
    if system:
        msgs.append({"role": "system", "content": _need_str(system, path, line, "system")})
    history = _pick(rec, "history", columns) or []
    if not isinstance(history, list):
        raise DataError("history must be a list of [query, response] pairs", file=str(path), line=line, field="history")
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"history[{i}] must be a [query, response] pair of strings", file=str(path), line=line, field="history")
        msgs += [{"role": "user", "content": _need_str(turn[0], path, line, "history", allow_empty=True)},
                 {"role": "assistant", "content": _need_str(turn[1], path, line, "history", allow_empty=True)}]
    user = ins if not inp else f"{ins}\n{inp}"
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    return msgs


def _sharegpt(rec: dict, path: Path, line: int, columns: dict[str, str], tags: dict[str, str]) -> list[dict[str, str]]:
    key = columns.get("messages") or columns.get("conversations") or ("conversations" if "conversations" in rec else "messages")
    conv = rec.get(key)
    if conv is None:
        raise DataError("missing field", file=str(path), line=line, field=key)
    if not isinstance(conv, list) or not conv:
        raise DataError("must be a non-empty list of turns", file=str(path), line=line, field=key)
    role_tag = tags.get("role_tag") or ("from" if isinstance(conv[0], dict) and "from" in conv[0] else "role")
    content_tag = tags.get("content_tag") or ("value" if role_tag == "from" else "content")
    roles = dict(ROLE_MAP)
    if "user_tag" in tags:
        roles[tags["user_tag"]] = "user"
    if "assistant_tag" in tags:
        roles[tags["assistant_tag"]] = "assistant"
    msgs = []
    for i, turn in enumerate(conv):
        fname = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError("turn must be an object", file=str(path), line=line, field=fname)
        role = turn.get(role_tag)
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"unknown role {role!r}", file=str(path), line=line, field=f"{fname}.{role_tag}")
        content = _need_str(turn.get(content_tag), path, line, f"{fname}.{content_tag}")
        msgs.append({"role": roles[role], "content": content})
    if rec.get("system") and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": _need_str(rec["system"], path, line, "system")})
    if msgs[-1]["role"] != "assistant":
        raise DataError("conversation must end with an assistant turn", file=str(path), line=line, field=key)
    if not any(m["role"] == "user" for m in msgs):
        raise DataError("conversation has no user turn", file=str(path), line=line, field=key)
    return msgs


def _text(rec: dict, path: Path, line: int, columns: dict[str, str]) -> list[dict[str, str]]:
    name = columns.get("text", "text")
    t = _need_str(rec.get(name), path, line, name)
    m = _DOLLY.match(t)
    if not m or not m.group("q").strip() or not m.group("a").strip():
        raise DataError("text must look like '### Human: question ### Assistant: answer'", file=str(path), line=line, field=name)
    return [{"role": "user", "content": m.group("q").strip()}, {"role": "assistant", "content": m.group("a").strip()}]


def _dataset_info(spec: str) -> tuple[Path, str, dict[str, str], dict[str, str]]:
    info_path, _, name = spec.partition("#")
    p = Path(info_path)
    try:
        info = json.loads(read_text(p))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", file=str(p), line=e.lineno) from None
    except (RecursionError, ValueError) as e:
        raise DataError(f"invalid JSON: {json_limit(e)}", file=str(p)) from None
    if not isinstance(info, dict):
        raise DataError("must be a JSON object mapping dataset names to entries", file=str(p))
    if not name:
        raise DataError("name the dataset: DIR/dataset_info.json#NAME", file=str(p))
    if name not in info:
        raise DataError(f"no dataset named {name!r} (have: {', '.join(sorted(info))})", file=str(p), field=name)
    entry = info[name]
    if not isinstance(entry, dict):
        raise DataError("entry must be a JSON object", file=str(p), field=name)
    if "file_name" not in entry:
        raise DataError("entry has no file_name (hub datasets are not readable offline)", file=str(p), field=f"{name}.file_name")
    if not isinstance(entry["file_name"], str):
        raise DataError("must be a file name (a string)", file=str(p), field=f"{name}.file_name")
    for key in ("columns", "tags"):
        v = entry.get(key, {})
        if not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())):
            raise DataError("must be an object mapping names to strings", file=str(p), field=f"{name}.{key}")
    fmt = entry.get("formatting", "alpaca")
    cols = dict(entry.get("columns", {}))
    mapping = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history", "messages": "messages"}
    columns = {mapping[k]: v for k, v in cols.items() if k in mapping}
    return p.parent / entry["file_name"], fmt, columns, dict(entry.get("tags", {}))


def _messages(rec: Any, p: Path, line: int, fmt: str, columns: dict[str, str],
              tags: dict[str, str]) -> list[dict[str, str]]:
    """One record in any supported format -> chat messages ending with the answer."""
    if not isinstance(rec, dict):
        raise DataError(f"record must be a JSON object, got {type(rec).__name__}", file=str(p), line=line)
    kind = _detect(rec, columns) if fmt == "auto" else fmt
    if kind == "sharegpt":
        return _sharegpt(rec, p, line, columns, tags)
    if kind == "text":
        return _text(rec, p, line, columns)
    if kind == "alpaca":
        return _alpaca(rec, p, line, columns)
    raise DataError(f"unknown format {kind!r}", file=str(p), field="format")


def read_examples(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None) -> list[Example]:
    """Read one data file into Examples; raises DataError naming file, line and field."""
    spec = str(path)
    tags: dict[str, str] = {}
    columns = dict(columns or {})
    if "dataset_info.json#" in spec or spec.endswith("dataset_info.json"):
        p, fmt, columns, tags = _dataset_info(spec)
    else:
        p = Path(spec)
    suffix = p.suffix.lower()
    if p.is_dir():
        raise DataError("is a folder; expected a data file (.json, .jsonl or .csv)", file=str(p))
    if suffix not in (".json", ".jsonl", ".csv"):
        raise DataError(f"unknown file type {suffix or '(none)'!r}: expected .json, .jsonl or .csv", file=str(p))
    text = read_text(p)
    records = records_csv(p, text) if suffix == ".csv" else records_json(p, text)
    in_array = suffix != ".csv" and text.lstrip().startswith("[")
    out: list[Example] = []
    for index, (line, rec) in enumerate(records, 1):
        try:
            msgs = _messages(rec, p, line, fmt, columns, tags)
        except DataError as e:
            if not in_array or e.line is None:
                raise
            # In an array the line alone may not find the record (a one-line file is all line 1).
            raise DataError(f"{e.message} (record {index:,} of the array)", file=e.file, line=e.line,
                            field=e.field) from None
        out.append(Example(msgs, str(p), line))
    if not out:
        raise DataError("no records", file=str(p))
    return out


def group_references(examples: list[Example]) -> list[Example]:
    """Merge examples with the same prompt into one with several references (E2E: one MR, many refs)."""
    by_prompt: dict[str, Example] = {}
    for ex in examples:
        key = json.dumps(ex.prompt_messages, ensure_ascii=False)
        if key in by_prompt:
            by_prompt[key].references.append(ex.label)
        else:
            by_prompt[key] = Example(ex.messages, ex.source, ex.line, [ex.label])
    return list(by_prompt.values())
