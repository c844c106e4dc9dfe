"""What a diagnosis says: one `Finding` per problem, with the numbers behind it and a config patch.

A finding is written for a person first (summary, explanation, fix) and for a program second
(kind, severity, steps, evidence, config_patch), so `diagnosis.json` can drive `--write-config`
and the report alike.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Ordered: index = rank. "info" is an observation (nothing is wrong, or too little evidence to say),
# "warning" a problem that costs quality or compute, "critical" a run whose result should not be used.
SEVERITIES = ("info", "warning", "critical")

KINDS = ("divergence", "overfitting", "forgetting", "fluctuation", "grad_explosion", "warmup_too_short",
         "plateau", "lr_too_low", "truncation", "no_validation", "insufficient_data")


@dataclass
class Finding:
    """One diagnosed problem; `config_patch` maps TrainConfig keys to the values that fix it."""

    kind: str
    severity: str
    summary: str
    explanation: str
    fix: str
    steps: list[int] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    config_patch: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def rank(self) -> int:
        return SEVERITIES.index(self.severity)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["evidence"] = {k: _jsonable(v) for k, v in self.evidence.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Finding":
        keys = {"kind", "severity", "summary", "explanation", "fix", "steps", "evidence", "config_patch"}
        return cls(**{k: v for k, v in d.items() if k in keys})


def _jsonable(v: Any) -> Any:
    """Round floats for readability and turn NaN/inf into strings (strict JSON has neither)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, str)):
        return v
    if hasattr(v, "item") and not isinstance(v, float):   # numpy scalars
        return _jsonable(v.item())
    if isinstance(v, float):
        f = float(v)
        if not math.isfinite(f):
            return str(f)
        return float(f"{f:.4g}")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Most severe first; within a severity, the order of KINDS (most consequential first)."""
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(findings, key=lambda f: (-f.rank, order.get(f.kind, len(order))))


def format_steps(steps: list[int], limit: int = 8) -> str:
    if not steps:
        return ""
    shown = ", ".join(str(s) for s in steps[:limit])
    return f"step{'s' if len(steps) > 1 else ''} {shown}" + (f" (+{len(steps) - limit} more)" if len(steps) > limit else "")


def format_patch(patch: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in patch.items())


def format_findings(findings: list[Finding]) -> str:
    """A plain-text summary for the terminal, most severe first."""
    if not findings:
        return "No problems found: training and validation curves look healthy."
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    head = ", ".join(f"{n} {s}" for s, n in reversed(counts.items()) if n)
    # Info items are notes about the setup (sampling noise of a small batch, a missing warmup that did no
    # harm), not problems: a run with only notes is a healthy run and says so first.
    problems = counts.get("warning", 0) + counts.get("critical", 0)
    notes = head.replace('info', 'note' + ('s' if counts['info'] > 1 else ''))
    verdict = ("Too little evidence for a verdict" if any(f.kind == "insufficient_data" for f in findings)
               else "No problems found")
    lines = [f"Diagnosis: {head}" if problems else f"{verdict} ({notes}).", ""]
    for f in sort_findings(findings):
        where = format_steps(f.steps)
        lines.append(f"[{f.severity.upper()}] {f.kind}: {f.summary}" + (f" ({where})" if where else ""))
        lines.append(f"    Why: {f.explanation}")
        lines.append(f"    Fix: {f.fix}")
        if f.config_patch:
            lines.append(f"    Config patch: {format_patch(f.config_patch)}")
        lines.append("")
    return "\n".join(lines).rstrip()
