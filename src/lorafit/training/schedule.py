"""Learning-rate schedules: linear warmup, then decay. Pure functions of the step, so a resumed
run gets exactly the LR an uninterrupted one would have had (no scheduler state to restore)."""
from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, warmup: int, total: int, kind: str = "cosine",
          min_ratio: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based: the LR used to take step `step`+1)."""
    floor = peak * min_ratio
    # Warmup: ramp linearly from peak/warmup to peak, so the very first step is not taken at 0.
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    if kind == "inverse_sqrt":
        # "Attention is all you need": lr ∝ min(step^-0.5, step * warmup^-1.5), scaled to hit
        # `peak` at the end of warmup and decay as 1/sqrt(step) afterwards.
        return peak * math.sqrt(max(warmup, 1) / (step + 1))
    # Decay phase progress in [0, 1].
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    # cosine: half a cosine from peak down to the floor.
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
