"""Per-prompt flips: the prompts whose score the fine-tune raised or lowered most.

A set's mean hides which answers got better and which got worse; the extremes are where a reader
checks that the gain is real (the tuned answer really is better) and what the fine-tune broke.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

FLIPS = 10
TEXT_CHARS = 1000   # long answers are cut in metrics.json (the predictions files keep them whole)


def top_flips(prompts: Sequence[str], labels: Sequence[str | Sequence[str]], before: Sequence[str],
              after: Sequence[str], score_before: np.ndarray, score_after: np.ndarray, *, n: int = FLIPS,
              metric: str = "rouge-l") -> dict[str, Any]:
    """``{"metric", "improved": [...], "regressed": [...]}``: up to ``n`` prompts each, largest change
    first (ties: earlier prompt first), each with prompt, reference, before, after and the scores.
    Only prompts that changed in that direction are listed."""
    d = np.asarray(score_after, dtype=float) - np.asarray(score_before, dtype=float)
    order = np.argsort(-d, kind="stable")

    def row(i: int) -> dict[str, Any]:
        ref = labels[i]
        return {"index": int(i), "prompt": _cut(prompts[i]),
                "reference": _cut(ref) if isinstance(ref, str) else [_cut(r) for r in ref],
                "before": _cut(before[i]), "after": _cut(after[i]), "score_before": float(score_before[i]),
                "score_after": float(score_after[i]), "delta": float(d[i])}

    improved = [row(int(i)) for i in order if d[i] > 0][:n]
    regressed = [row(int(i)) for i in np.argsort(d, kind="stable") if d[i] < 0][:n]
    return {"metric": metric, "improved": improved, "regressed": regressed}


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…"
