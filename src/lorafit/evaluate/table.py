"""metrics.json -> the write-up's Markdown table (before / after / delta per set, forgetting beside gains)."""
from __future__ import annotations

from typing import Any

from .metrics import KEYS

_HEAD = {"rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-L", "bleu-4": "BLEU-4"}
GENERAL = "general"  # the forgetting set's name in a run (config key general_eval)


def metrics_table_md(metrics: dict[str, Any]) -> str:
    """Markdown for ``eval/metrics.md``: reads only metrics.json's documented keys."""
    sets: dict[str, Any] = metrics.get("sets", {})
    cols = [_HEAD[k] for k in KEYS]
    lines = [
        "# Evaluation: before vs after fine-tuning", "",
        f"Metric mode `{metrics.get('mode')}`; scores 0-100. *before* = base model, *after* = base + adapter, "
        "greedy decoding. *loss* = mean token loss on the reference answers (lower is better).", "",
        "| set | lang | n | model | " + " | ".join(cols) + " | loss |",
        "|---|---|---:|---|" + "---:|" * (len(cols) + 1),
    ]
    for name, s in sets.items():
        lb, la = s.get("loss_before"), s.get("loss_after")
        dl = None if lb is None or la is None else la - lb
        lines.append(f"| {name} | {s.get('lang')} | {s.get('n')} | before | {_row(s['before'])} | {_num(lb, 3)} |")
        lines.append(f"|  |  |  | after | {_row(s['after'])} | {_num(la, 3)} |")
        lines.append(f"|  |  |  | **delta** | {_row(s['delta'], signed=True)} | {_num(dl, 3, signed=True)} |")
    if GENERAL in sets:
        lines += ["", "## Domain gains vs forgetting", "",
                  "A fine-tune that works raises the domain sets and leaves the general set (and its loss) "
                  "where it was; a falling general score or a rising general loss is forgetting.", "",
                  "| set | role | " + " | ".join(f"Δ {c}" for c in cols) + " | Δ loss |",
                  "|---|---|" + "---:|" * (len(cols) + 1)]
        for name, s in sorted(sets.items(), key=lambda kv: kv[0] == GENERAL):
            lb, la = s.get("loss_before"), s.get("loss_after")
            dl = None if lb is None or la is None else la - lb
            role = "general (forgetting)" if name == GENERAL else "domain"
            lines.append(f"| {name} | {role} | {_row(s['delta'], signed=True)} | {_num(dl, 3, signed=True)} |")
    return "\n".join(lines) + "\n"


def _row(scores: dict[str, float], signed: bool = False) -> str:
    return " | ".join(_num(scores.get(k), 2, signed) for k in KEYS)


def _num(v: float | None, digits: int, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
