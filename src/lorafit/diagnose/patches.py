"""Config patches: the TrainConfig changes a finding recommends, and how several combine.

Patches are built from the run's own resolved config (halve *this* run's learning rate, not a
generic one), and merged conservatively when several findings touch the same key: the lower
learning rate, the shorter run, the stronger regularisation wins.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from .findings import Finding, sort_findings

DEFAULTS = {"learning_rate": 1e-4, "max_grad_norm": 1.0, "warmup_ratio": 0.1, "warmup_steps": 20,
            "gradient_accumulation_steps": 1, "lora_dropout": 0.1, "weight_decay": 0.0, "num_epochs": 5}


def round_sig(x: float, digits: int = 2) -> float:
    """1.2345e-4 -> 1.2e-4: learning rates read better with two significant digits."""
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def _get(s: Any, key: str) -> Any:
    v = s.config.get(key)
    return DEFAULTS.get(key) if v is None else v


def lower_lr(s: Any, factor: float) -> dict[str, Any]:
    lr = s.peak_lr or _get(s, "learning_rate")
    return {"learning_rate": round_sig(lr * factor)}


def safer_clipping(s: Any) -> dict[str, Any]:
    clip = s.config.get("max_grad_norm")
    if clip is None or clip == 0 or clip > 1.0:
        return {"max_grad_norm": 1.0}
    return {}


def longer_warmup(s: Any, force: bool = False) -> dict[str, Any]:
    """Warmup of ~10% of the run (the write-up's default), only when the current one is shorter."""
    total = s.total_steps or 0
    w = s.warmup_steps()
    if not force and w is not None and total and w >= 0.05 * total:
        return {}
    ratio = max(0.1, float(s.config.get("warmup_ratio") or 0.0))
    steps = max(20, int(s.config.get("warmup_steps") or 0))
    if total:
        steps = min(steps, max(1, total // 5))
    return {"warmup_ratio": ratio, "warmup_steps": steps}


def _union(a: list[str], b: list[str]) -> list[str]:
    return list(dict.fromkeys(list(a) + list(b)))


_MERGE: dict[str, Callable[[Any, Any], Any]] = {
    "learning_rate": min, "num_epochs": min, "max_steps": min, "max_grad_norm": min,
    "lora_dropout": max, "weight_decay": max, "warmup_ratio": max, "warmup_steps": max,
    "gradient_accumulation_steps": max, "early_stopping_patience": min, "general_ratio": max,
    "augment": _union, "general_data": _union, "max_length": max,
}


def merge_patches(findings: list[Finding]) -> dict[str, Any]:
    """One patch from all findings; most severe findings first, conflicts resolved per key."""
    out: dict[str, Any] = {}
    for f in sort_findings(findings):
        for k, v in f.config_patch.items():
            out[k] = _MERGE.get(k, lambda old, new: old)(out[k], v) if k in out else v
    return out
