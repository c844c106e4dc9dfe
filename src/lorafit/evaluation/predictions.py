"""Predictions files in LLaMA-Factory's generated_predictions.jsonl format, and scoring them.

One JSON object per line: ``{"prompt": str, "predict": str, "label": str}``. lorafit writes ``label``
as a list of strings when a prompt has several references (E2E); LLaMA-Factory's own files always
have one string and are read unchanged. ``prompt`` is optional when reading (scores don't need it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import DataError
from ..data.readers import json_limit
from .metrics import score_predictions

Label = str | list[str]


def write_predictions(path: str | Path, prompts: Sequence[str], preds: Sequence[str],
                      labels: Sequence[Label], extra: Sequence[dict[str, Any]] | None = None) -> Path:
    """Write one ``{"prompt", "predict", "label"}`` line per example (UTF-8, CJK kept readable).

    ``extra``: more fields per line (lorafit eval adds ``no_eos``, ``loss_sum``, ``loss_tokens``);
    readers of the format ignore fields they do not know."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    more = extra if extra is not None else [{}] * len(prompts)
    with path.open("w", encoding="utf-8") as f:
        for prompt, pred, label, x in zip(prompts, preds, labels, more, strict=True):
            f.write(json.dumps({"prompt": prompt, "predict": pred, "label": label, **x}, ensure_ascii=False) + "\n")
    return path


def iter_json_objects(path: str | Path, what: str = "predictions") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a predictions file.

    The one reader of predictions files (scoring and the blind test both use it): bad bytes, bad JSON
    and non-objects become a DataError naming the file and line; an empty file is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found", file=str(path))
    seen = False
    for i, line_bytes in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = line_bytes.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 (byte {e.start} of the line)", file=str(path), line=i) from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"unreadable line: not valid JSON, invalid JSON ({e.msg}, column {e.colno})",
                            file=str(path), line=i) from None
        except (RecursionError, ValueError) as e:  # 100k-deep nesting; a number over 4,300 digits
            raise DataError(f"unreadable line: invalid JSON ({json_limit(e)})", file=str(path), line=i) from None
        if not isinstance(rec, dict):
            raise DataError(f"expected a JSON object, got {type(rec).__name__}", file=str(path), line=i)
        seen = True
        yield i, rec
    if not seen:
        raise DataError(f"no {what} (empty file)", file=str(path))


def read_predictions(path: str | Path) -> tuple[list[str], list[Label]]:
    """(predictions, labels) from a predictions file; DataError names the file, line and field."""
    preds: list[str] = []
    labels: list[Label] = []
    for i, rec in iter_json_objects(path):
        preds.append(string_field(rec, "predict", Path(path), i))
        labels.append(label_field(rec, Path(path), i))
    return preds, labels


def string_field(rec: dict, name: str, path: Path, line: int) -> str:
    if name not in rec:
        raise DataError("missing field", file=str(path), line=line, field=name)
    v = rec[name]
    if not isinstance(v, str):
        raise DataError(f"expected a string, got {_kind(v)}", file=str(path), line=line, field=name)
    return v


def label_field(rec: dict, path: Path, line: int) -> Label:
    v: Any = rec.get("label")
    if isinstance(v, list):
        if not v:
            raise DataError("empty list of references", file=str(path), line=line, field="label")
        if not all(isinstance(x, str) for x in v):
            raise DataError("expected a string or a list of strings (references must all be strings)",
                            file=str(path), line=line, field="label")
        return list(v)
    if "label" in rec and not isinstance(v, str):
        raise DataError(f"expected a string or a list of strings, got {_kind(v)}", file=str(path), line=line,
                        field="label")
    return string_field(rec, "label", path, line)


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def health_file(path: str | Path) -> dict[str, Any]:
    """Generation health (evaluate/health.py) of a predictions file. ``no_eos`` is None unless every
    line carries it (lorafit eval's own files do); without a ``prompt`` the expected language is the
    reference's."""
    from .health import health

    prompts, preds, labels, flags = [], [], [], []
    for i, rec in iter_json_objects(path):
        preds.append(string_field(rec, "predict", Path(path), i))
        labels.append(label_field(rec, Path(path), i))
        prompt = rec.get("prompt")
        ref = labels[-1] if isinstance(labels[-1], str) else labels[-1][0]
        prompts.append(prompt if isinstance(prompt, str) and prompt.strip() else ref)
        flags.append(rec.get("no_eos"))
    known = all(isinstance(f, bool) for f in flags)
    return health(prompts, preds, labels, flags if known else None)


def score_file(path: str | Path, mode: str = "llamafactory", lang: str | None = None) -> dict[str, float]:
    """``rouge-1``, ``rouge-2``, ``rouge-l``, ``bleu-4`` (0-100) of a predictions file, any producer's."""
    preds, labels = read_predictions(path)
    try:
        return score_predictions(preds, labels, mode=mode, lang=lang)
    except DataError as e:
        raise DataError(e.message, file=str(path), line=e.line, field=e.field) from None
