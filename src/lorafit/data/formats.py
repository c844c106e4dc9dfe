"""Records in any supported format -> `Example`s: chat messages ending with the answer (the label).

Formats: alpaca (with system and history), ShareGPT (`from`/`value` or `role`/`content`), Dolly-style
text, and LLaMA-Factory's dataset_info.json; `readers` supplies the (line, record) pairs. Errors name
file, line and field.

Field aliases (used when no ``columns`` mapping is given): instruction <- instruction | prompt |
question | query | mr; input <- input | query (query is the input only beside another instruction field);
output <- output | response | answer | std_answer | ref. `context` is not an alias: databricks-dolly-15k's
is the passage a question needs, Bitext's a constant label ("customer support"); map it with
``columns: {input: context}`` where it is the input. Text in a field that no format reads is not dropped
unseen: one warning per file names the fields.

Tools: a record's tool definitions (LLaMA-Factory's `tools` column, a JSON string, or OpenAI's list) join its
system turn as text (`tools_text`), the same for every chat template; function calls (LLaMA-Factory's
`function_call` turns, OpenAI's `tool_calls` or older `function_call`) are trained as the JSON text they
hold, and their results (`observation`, `tool`, `function`) are user turns. OpenAI's content parts are joined when they are all text.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .readers import json_document, read_text, records_csv, records_json

log = logging.getLogger(__name__)

ALIASES = {
    "instruction": ("instruction", "prompt", "question", "query", "mr"),
    "input": ("input", "query"),
    "output": ("output", "response", "answer", "std_answer", "ref"),
    "system": ("system",),
    "history": ("history",),
}
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "model": "assistant", "bot": "assistant", "system": "system", "observation": "user",
            "function_call": "assistant", "tool": "user", "function": "user"}  # function: OpenAI's older tool result
_DOLLY_TURN = re.compile(r"### (Human|Assistant):")
_DOLLY_SHAPE = "expected '### Human: question ### Assistant: answer', more turns alternating the same way"
# Fields that hold no prompt or answer text: never reported as unused.
_NOT_CONTENT = frozenset({"id", "idx", "category", "source", "lang", "language", "url", "license"})
_FORMATTINGS = ("alpaca", "sharegpt")  # dataset_info.json's `formatting` values


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
    """The field `_pick` reads (a loop, not next() over a generator: this runs several times a record)."""
    if key in columns:
        return columns[key]
    for alias in ALIASES.get(key, (key,)):
        if alias in rec:
            return alias
    return key


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


def _alpaca(rec: dict, path: Path, line: int, columns: dict[str, str], used: set[str]) -> list[dict[str, str]]:
    f_ins, f_out = _field_name(rec, "instruction", columns), _field_name(rec, "output", columns)
    f_sys, f_hist = _field_name(rec, "system", columns), _field_name(rec, "history", columns)
    used.update((f_ins, f_out, f_sys, f_hist))
    ins = _need_str(rec.get(f_ins), path, line, f_ins)
    out = _need_str(rec.get(f_out), path, line, f_out)
    inp = _input(rec, path, line, columns, {f_ins, f_out}, used)
    msgs: list[dict[str, str]] = []
    system = rec.get(f_sys)
    if system:
        msgs.append({"role": "system", "content": _need_str(system, path, line, f_sys)})
    history = rec.get(f_hist) or []
    if not isinstance(history, list):
        raise DataError("history must be a list of [query, response] pairs", file=str(path), line=line, field=f_hist)
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"history[{i}] must be a [query, response] pair of strings", file=str(path), line=line, field=f_hist)
        # Empty like an empty output: an empty answer would be trained on as "say nothing".
        msgs += [{"role": "user", "content": _need_str(turn[0], path, line, f"{f_hist}[{i}][0]")},
                 {"role": "assistant", "content": _need_str(turn[1], path, line, f"{f_hist}[{i}][1]")}]
    user = ins if not inp else f"{ins}\n{inp}"
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    return msgs


def _input(rec: dict, path: Path, line: int, columns: dict[str, str], taken: set[str], used: set[str]) -> str:
    """The text joined under the instruction: input or query (unless that is the instruction).

    Two non-empty ones are refused: which to keep, or how to join them, would be a guess.
    """
    names = [columns["input"]] if "input" in columns else [a for a in ALIASES["input"] if a in rec and a not in taken]
    used.update(names)
    given = {}
    for name in names:
        v = rec.get(name)
        if v is not None and (v := _need_str(v, path, line, name, allow_empty=True)):
            given[name] = v
    if len(given) > 1:
        raise DataError(f"fields {' and '.join(map(repr, given))} both hold the input; keep one", file=str(path),
                        line=line, field=list(given)[1])
    return next(iter(given.values()), "")


def _sharegpt(rec: dict, path: Path, line: int, columns: dict[str, str], tags: dict[str, str],
              used: set[str]) -> list[dict[str, str]]:
    key = columns.get("messages") or columns.get("conversations") or ("conversations" if "conversations" in rec else "messages")
    f_sys = columns.get("system", "system")
    used.update((key, f_sys))
    conv = rec.get(key)
    if conv is None:
        raise DataError("missing field", file=str(path), line=line, field=key)
    if not isinstance(conv, list) or not conv:
        raise DataError("must be a non-empty list of turns", file=str(path), line=line, field=key)
    role_tag = tags.get("role_tag") or ("from" if isinstance(conv[0], dict) and "from" in conv[0] else "role")
    content_tag = tags.get("content_tag") or ("value" if role_tag == "from" else "content")
    roles = dict(ROLE_MAP)
    # LLaMA-Factory's dataset_info `tags`: each names the value its role field takes for that role
    for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system"),
                      ("observation_tag", "user"), ("function_tag", "assistant")):
        if tag in tags:
            roles[tags[tag]] = role
    msgs = []
    for i, turn in enumerate(conv):
        fname = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError("turn must be an object", file=str(path), line=line, field=fname)
        role = turn.get(role_tag)
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"unknown role {role!r}", file=str(path), line=line, field=f"{fname}.{role_tag}")
        content = _turn_text(turn, content_tag, roles[role], path, line, f"{fname}.{content_tag}", fname)
        msg = {"role": roles[role], "content": content}
        if "weight" in turn:  # OpenAI's fine-tuning format: an assistant turn with weight 0 is context, not trained
            w = turn["weight"]
            if w not in (0, 1) or isinstance(w, bool) or roles[role] != "assistant":
                raise DataError("weight must be 0 or 1, on an assistant turn", file=str(path), line=line,
                                field=f"{fname}.weight")
            msg["weight"] = int(w)
        msgs.append(msg)
    if msgs[-1]["role"] != "assistant":
        raise DataError("conversation must end with an assistant turn", file=str(path), line=line, field=key)
    if not any(m["role"] == "user" for m in msgs):
        raise DataError("conversation has no user turn", file=str(path), line=line, field=key)
    first = next(i for i, m in enumerate(msgs) if m["role"] != "system")
    if msgs[first]["role"] != "user":  # an answer to nothing: no prompt to render before it
        raise DataError("a conversation must start with a user turn (after an optional system turn)",
                        file=str(path), line=line, field=f"{key}[{first}]")
    if rec.get(f_sys) and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": _need_str(rec[f_sys], path, line, f_sys)})
    return msgs


def _turn_text(turn: dict, content_tag: str, role: str, path: Path, line: int, name: str, fname: str) -> str:
    """A turn's text: a string; OpenAI's list of content parts (text parts only, joined); an assistant's
    OpenAI `tool_calls`, each as the JSON object {"name", "arguments"} it asks for (after the text, if any)."""
    content = turn.get(content_tag)
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"only text content parts are supported, got {kind!r}", file=str(path), line=line,
                                field=f"{name}[{j}]")
            texts.append(part["text"])
        content = "".join(texts)
    calls = turn.get("tool_calls")
    if calls is None and isinstance(turn.get("function_call"), dict):  # OpenAI's older single call
        calls = [{"type": "function", "function": turn["function_call"]}]
    if calls is None:
        return _need_str(content, path, line, name)
    if role != "assistant" or not isinstance(calls, list) or not calls:
        raise DataError("tool_calls must be a non-empty list, on an assistant turn", file=str(path), line=line,
                        field=f"{fname}.tool_calls")
    rendered = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise DataError("each tool call needs a function with a name", file=str(path), line=line,
                            field=f"{fname}.tool_calls[{j}]")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends the arguments as a JSON string
            try:
                args = json.loads(args) if args.strip() else {}
            except (RecursionError, ValueError):
                raise DataError("arguments must be JSON", file=str(path), line=line,
                                field=f"{fname}.tool_calls[{j}].function.arguments") from None
        rendered.append(json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False))
    text = _need_str(content, path, line, name, allow_empty=True) if content is not None else ""
    return "\n".join(([text] if text.strip() else []) + rendered)


def _text(rec: dict, path: Path, line: int, columns: dict[str, str], used: set[str]) -> list[dict[str, str]]:
    """Dolly-style text: '### Human: q ### Assistant: a', possibly several turns, split at every marker."""
    name = columns.get("text", "text")
    used.add(name)
    t = _need_str(rec.get(name), path, line, name)
    parts = _DOLLY_TURN.split(t)  # [before the first marker, "Human", q1, "Assistant", a1, ...]

    def bad(why: str) -> DataError:
        return DataError(f"{why}; {_DOLLY_SHAPE}", file=str(path), line=line, field=name)

    if parts[0].strip() or len(parts) == 1:
        raise bad("text must start with '### Human:'")
    msgs = []
    for k, (who, content) in enumerate(zip(parts[1::2], parts[2::2])):
        want = "Human" if k % 2 == 0 else "Assistant"
        if who != want:
            raise bad(f"turn {k + 1} is '### {who}:' where '### {want}:' belongs")
        if not content.strip():
            raise bad(f"turn {k + 1} ('### {who}:') is empty")
        msgs.append({"role": "user" if who == "Human" else "assistant", "content": content.strip()})
    if msgs[-1]["role"] != "assistant":
        raise bad("text must end with an '### Assistant:' answer")
    return msgs


def _dataset_info(spec: str) -> tuple[Path, str, dict[str, str], dict[str, str]]:
    info_path, _, name = spec.partition("#")
    p = Path(info_path)
    info = json_document(p, read_text(p))
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
    if fmt not in _FORMATTINGS:
        raise DataError(f"unknown formatting {fmt!r}; expected one of {', '.join(_FORMATTINGS)}", file=str(p),
                        field=f"{name}.formatting")
    cols = dict(entry.get("columns", {}))
    mapping = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history", "messages": "messages", "tools": "tools"}
    columns = {mapping[k]: v for k, v in cols.items() if k in mapping}
    return p.parent / entry["file_name"], fmt, columns, dict(entry.get("tags", {}))


def _messages(rec: Any, p: Path, line: int, fmt: str, columns: dict[str, str],
              tags: dict[str, str], used: set[str]) -> tuple[str, list[dict[str, str]]]:
    """One record in any supported format -> (its format, chat messages ending with the answer).

    The names of the fields read are added to `used`, so the caller can report text left unread.
    """
    if not isinstance(rec, dict):
        raise DataError(f"record must be a JSON object, got {type(rec).__name__}", file=str(p), line=line)
    f_tools = columns.get("tools", "tools")
    used.add(f_tools)
    tools = _tools(rec.get(f_tools), p, line, f_tools)
    kind = _detect(rec, columns) if fmt == "auto" else fmt
    if kind == "sharegpt":
        msgs = _sharegpt(rec, p, line, columns, tags, used)
    elif kind == "text":
        msgs = _text(rec, p, line, columns, used)
    elif kind == "alpaca":
        msgs = _alpaca(rec, p, line, columns, used)
    else:
        raise DataError(f"unknown format {kind!r}", file=str(p), field="format")
    if tools:  # the definitions the calls refer to: dropped, they would teach calls to functions never seen
        text = tools_text(tools)
        if msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{text}"}
        else:
            msgs.insert(0, {"role": "system", "content": text, "only_tools": True})  # system_prompt still applies
    return kind, msgs


TOOLS_PREAMBLE = "You have access to the following tools:"
TOOLS_USAGE = 'To call a tool, answer with a JSON object holding its "name" and "arguments".'


def tools_text(tools: list[dict[str, Any]]) -> str:
    """Tool definitions as the system turn's text, one JSON object a line: the same for every chat template
    (a function call is trained as the JSON text the data holds, its result as a user turn)."""
    lines = [json.dumps(t, ensure_ascii=False, sort_keys=False) for t in tools]
    return "\n".join([TOOLS_PREAMBLE, *lines, TOOLS_USAGE])


def _tools(v: Any, path: Path, line: int, name: str) -> list[dict[str, Any]]:
    """A record's tool definitions: LLaMA-Factory's JSON string or a list, each a function definition
    ({"name", "description", "parameters"}) or OpenAI's {"type": "function", "function": {...}}. An empty
    value (None, "", "[]") means no tools."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return []
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except (RecursionError, ValueError) as e:
            raise DataError(f"tools must be a JSON list of function definitions: {e}", file=str(path), line=line,
                            field=name) from None
    if not isinstance(v, list):
        raise DataError(f"tools must be a list of function definitions, got {type(v).__name__}", file=str(path),
                        line=line, field=name)
    out = []
    for i, t in enumerate(v):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise DataError("each tool must be an object with a non-empty \"name\"", file=str(path), line=line,
                            field=f"{name}[{i}]")
        out.append(fn)
    return out


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
    unused: set[str] = set()  # fields holding text that no format read
    unused_in: set[str] = set()  # the formats of the records that had them
    for index, (line, rec) in enumerate(records, 1):
        used: set[str] = set()
        try:
            kind, msgs = _messages(rec, p, line, fmt, columns, tags, used)
        except DataError as e:
            if not in_array or e.line is None:
                raise
            # In an array the line alone may not find the record (a one-line file is all line 1).
            raise DataError(f"{e.message} (record {index:,} of the array)", file=e.file, line=e.line,
                            field=e.field) from None
        out.append(Example(msgs, str(p), line))
        left = [k for k, v in rec.items() if isinstance(v, str) and v.strip() and k not in used and k not in _NOT_CONTENT]
        if left:
            unused.update(left)
            unused_in.add(kind)
    if not out:
        raise DataError("no records", file=str(p))
    if unused:  # one warning a file, not one a record
        log.warning("%s: ignoring the text in field(s) %s, which the %s format does not read; map them with "
                    "`columns` if they belong in the examples", p, ", ".join(sorted(unused)), "/".join(sorted(unused_in)))
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
