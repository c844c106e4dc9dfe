"""metrics.json -> the write-up's Markdown table (before / after / delta with its 95% interval per set,
forgetting beside gains, generation health)."""
from __future__ import annotations

from typing import Any

from .benchmarks import benchmarks_table_md
from .health import FIELDS
from .metrics import KEYS

_HEAD = {"rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-L", "bleu-4": "BLEU-4"}
GENERAL = "general"  # the forgetting set's name in a run (config key general_eval)


def fmt_delta(v: float | None, ci: list[float] | None = None, digits: int = 2) -> str:
    """"+18.10 [+15.61, +20.61]": a delta with its 95% interval (the interval left out when unknown)."""
    if v is None:
        return "–"
    out = f"{v:+.{digits}f}"
    if ci and len(ci) == 2 and None not in ci:
        out += f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    return out


def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def metrics_table_md(metrics: dict[str, Any]) -> str:
    """Markdown for ``eval/metrics.md``: reads only metrics.json's documented keys (older files, without
    intervals or health, render without them)."""
    sets: dict[str, Any] = metrics.get("sets", {})
    cols = [_HEAD[k] for k in KEYS]
    stats = metrics.get("stats") or {}
    lines = [
        "# Evaluation: before vs after fine-tuning", "",
        f"Metric mode `{metrics.get('mode')}`; scores 0-100. *before* = base model, *after* = base + adapter, "
        "greedy decoding. *loss* = mean token loss on the reference answers (lower is better).", "",
    ]
    if stats:
        lines += [f"*delta* [95% interval]: {stats.get('interval')}, {stats.get('resamples')} resamples, seed "
                  f"{stats.get('seed')}; *p*: {stats.get('test')}.", ""]
    lines += ["| set | lang | n | model | " + " | ".join(cols) + " | loss |",
              "|---|---|---:|---|" + "---:|" * (len(cols) + 1)]
    for name, s in sets.items():
        lb, la = s.get("loss_before"), s.get("loss_after")
        dl = _loss_delta(s)
        cis, ps = s.get("delta_ci95") or {}, s.get("p_value") or {}
        lines.append(f"| {name} | {s.get('lang')} | {s.get('n')} | before | {_row(s['before'])} | {_num(lb, 3)} |")
        lines.append(f"|  |  |  | after | {_row(s['after'])} | {_num(la, 3)} |")
        lines.append("|  |  |  | **delta** | " + " | ".join(fmt_delta(s["delta"].get(k), cis.get(k)) for k in KEYS)
                     + f" | {fmt_delta(dl, s.get('loss_delta_ci95'), 3)} |")
        if ps:
            lines.append("|  |  |  | p | " + " | ".join(fmt_p(ps.get(k)) for k in KEYS) + f" | {fmt_p(s.get('loss_p_value'))} |")
    if GENERAL in sets:
        lines += ["", "## Domain gains vs forgetting", "",
                  "A fine-tune that works raises the domain sets and leaves the general set (and its loss) "
                  "where it was; a falling general score or a rising general loss is forgetting.", "",
                  "| set | role | " + " | ".join(f"Δ {c}" for c in cols) + " | Δ loss |",
                  "|---|---|" + "---:|" * (len(cols) + 1)]
        for name, s in sorted(sets.items(), key=lambda kv: kv[0] == GENERAL):
            role = "general (forgetting)" if name == GENERAL else "domain"
            cis = s.get("delta_ci95") or {}
            lines.append(f"| {name} | {role} | " + " | ".join(fmt_delta(s["delta"].get(k), cis.get(k)) for k in KEYS)
                         + f" | {fmt_delta(_loss_delta(s), s.get('loss_delta_ci95'), 3)} |")
    lines += health_table_md(sets)
    if metrics.get("benchmarks"):
        lines += ["", benchmarks_table_md(metrics["benchmarks"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def health_table_md(sets: dict[str, Any]) -> list[str]:
    """Generation health per set and model (docs/evaluation.md defines each column)."""
    rows = [(name, side, s["health"][side]) for name, s in sets.items() if isinstance(s.get("health"), dict)
            for side in ("before", "after") if isinstance(s["health"].get(side), dict)]
    if not rows:
        return []
    out = ["", "## Generation health", "",
           "Shares of answers (0-1) that never emitted end-of-sequence, loop, are empty, leak chat-template "
           "text, or answer in the other language; *length_ratio* = median answer/reference length.", "",
           "| set | model | " + " | ".join(FIELDS) + " |", "|---|---|" + "---:|" * len(FIELDS)]
    for name, side, h in rows:
        out.append(f"| {name} | {side} | " + " | ".join(_num(h.get(k), 2) for k in FIELDS) + " |")
    return out


def _loss_delta(s: dict[str, Any]) -> float | None:
    lb, la = s.get("loss_before"), s.get("loss_after")
    return None if lb is None or la is None else la - lb


def _row(scores: dict[str, float], signed: bool = False) -> str:
    return " | ".join(_num(scores.get(k), 2, signed) for k in KEYS)


def _num(v: float | None, digits: int, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
