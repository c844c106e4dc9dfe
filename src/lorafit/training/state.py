"""What a run carries between its phases: the loop's state (what a checkpoint holds besides weights,
optimizer and RNG), a launched optimizer step awaiting its read-back, and the result `train` returns."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoopState", "PendingStep", "TrainResult"]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_eval: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    resumed_from: int | None = None


@dataclass
class LoopState:
    """Everything a checkpoint carries besides weights, optimizer and RNG (`state.json`)."""
    step: int = 0
    log_lines: int = 0
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    nonfinite_run: int = 0
    acc_loss: float = 0.0  # the running loss of the current logging window, so a resume logs the same mean
    acc_steps: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class PendingStep:
    """A launched optimizer step: what the host knows (lr, tokens, the normaliser) and the device values
    (summed loss, non-finite verdict, summed grad norm) to read back, after `event` where pipelined."""
    step: int
    lr: float
    denom: int
    tokens: int
    values: torch.Tensor
    event: Any = None
