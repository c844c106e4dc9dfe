"""Turning `log.jsonl` records into clean numeric series.

Logs are read defensively because every command must work on any run folder: a run killed mid-write
leaves a partial last line, a resumed run logs some steps twice (the later record wins), older runs
may lack `lr` or `grad_norm`, and a diverged run logs NaN losses (kept apart as `nonfinite_steps`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import rundir as R
from ..errors import RunError

# Fewer logged training losses than this get no verdict, only a note saying so: the detectors' noise,
# trend and spike statistics need about ten points before "nothing found" means anything.
MIN_TRAIN_RECORDS = 10


@dataclass
class RunSeries:
    """The numbers a diagnosis needs, sorted by step, with only finite values in the arrays."""

    steps: np.ndarray                      # train records' steps (finite loss only)
    loss: np.ndarray
    lr: np.ndarray | None                  # aligned with steps; None if the log has no usable LR
    grad_norm: np.ndarray | None           # aligned with steps; NaN where missing or non-finite
    epoch: np.ndarray | None
    nonfinite_steps: list[int]             # train records whose loss was NaN/inf
    evals: dict[str, tuple[np.ndarray, np.ndarray]]   # split -> (steps, eval_loss)
    events: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    # --- facts that fall back from config to the start event to the log itself ----------------
    def cfg(self, key: str, default: Any = None) -> Any:
        v = self.config.get(key)
        if v is None:
            for e in self.events:
                if e.get("event") == R.START and e.get(key) is not None:
                    return e[key]
            return default
        return v

    @property
    def last_step(self) -> int:
        cands = [int(self.steps[-1])] if len(self.steps) else []
        cands += [int(s[-1]) for s, _ in self.evals.values() if len(s)]
        cands += [int(e["step"]) for e in self.events if isinstance(e.get("step"), (int, float))]
        return max(cands, default=0)

    @property
    def total_steps(self) -> int:
        t = self.cfg("total_steps")
        return int(t) if isinstance(t, (int, float)) and t > 0 else self.last_step

    @property
    def logging_steps(self) -> int:
        v = self.cfg("logging_steps")
        if isinstance(v, (int, float)) and v > 0:
            return int(v)
        d = np.diff(self.steps)
        return int(np.median(d)) if len(d) else 1

    @property
    def eval_steps(self) -> int:
        v = self.cfg("eval_steps")
        if isinstance(v, (int, float)) and v > 0:
            return int(v)
        diffs = [np.median(np.diff(s)) for s, _ in self.evals.values() if len(s) > 1]
        return int(min(diffs)) if diffs else 0

    @property
    def peak_lr(self) -> float | None:
        v = self.config.get("learning_rate")
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
        return float(np.max(self.lr)) if self.lr is not None and len(self.lr) else None

    @property
    def examples_per_step(self) -> int | None:
        """Examples per optimizer step (times the data-parallel world size when the start event says)."""
        b, ga = self.config.get("batch_size"), self.config.get("gradient_accumulation_steps") or 1
        world = self.cfg("world_size", 1)
        if not all(isinstance(v, (int, float)) for v in (b, ga, world)):
            return None
        return int(b) * int(ga) * max(1, int(world))

    def warmup_steps(self) -> int | None:
        """Effective warmup: recorded by train, or read off the LR curve (where it first peaks)."""
        w = self.cfg("effective_warmup_steps")
        if isinstance(w, (int, float)):
            return int(w)
        if self.lr is not None and len(self.lr) > 2 and np.max(self.lr) > 0:
            i = int(np.argmax(self.lr >= 0.95 * np.max(self.lr)))
            return int(self.steps[i]) if i > 0 else 0
        return None

    def progress(self, steps: np.ndarray) -> np.ndarray:
        """Share (0-1) of the run's learning-rate integral done by each step; steps/total without an LR.

        Loss falls with the distance the optimiser travels, which is the LR integral: under a decaying
        schedule the last quarter of the steps moves the weights very little, so curves are compared
        in this coordinate, not in raw steps.
        """
        steps = np.asarray(steps, float)
        if self.lr is not None and len(self.steps) >= 3 and np.sum(self.lr) > 0:
            x, lr = np.concatenate([[0.0], self.steps]), np.concatenate([[self.lr[0]], self.lr])
        else:   # an older log without LR: rebuild the schedule from the config (lorafit's default: cosine)
            total = max(self.total_steps, int(steps.max(initial=1)), 1)
            x = np.linspace(0, total, min(total, 2000) + 1)
            lr = schedule_shape(x, self.cfg("lr_scheduler", "cosine"), self.warmup_steps() or 0, total,
                                float(self.config.get("min_lr_ratio") or 0.0))
        cum = np.concatenate([[0.0], np.cumsum(np.diff(x) * (lr[1:] + lr[:-1]) / 2)])
        return np.interp(steps, x, cum / cum[-1]) if cum[-1] > 0 else np.clip(steps / max(x[-1], 1), 0, 1)

    def validation_splits(self) -> list[str]:
        """In-domain validation splits (everything but 'general'), in the order they were logged."""
        return [s for s in self.evals if s != "general"]

    def train_level_at(self, step: float, width: int) -> float | None:
        """Median train loss over the records logged in (step - width, step]: the train side of a gap."""
        m = (self.steps > step - width) & (self.steps <= step)
        if not m.any():
            i = int(np.searchsorted(self.steps, step))
            m = np.zeros(len(self.steps), bool)
            m[max(0, i - 2): i + 1] = True
        return float(np.median(self.loss[m])) if m.any() else None


def schedule_shape(x: np.ndarray, kind: Any, warmup: int, total: int, min_ratio: float = 0.0) -> np.ndarray:
    """The LR multiplier (0-1) of lorafit's schedules at steps x; constant when the kind is unknown."""
    x = np.asarray(x, float)
    out = np.ones_like(x)
    if warmup > 0:
        out = np.where(x < warmup, np.maximum(x, 1) / warmup, 1.0)
    frac = np.clip((x - warmup) / max(1, total - warmup), 0, 1)
    after = x >= warmup
    if kind == "cosine":
        out = np.where(after, min_ratio + (1 - min_ratio) * 0.5 * (1 + np.cos(math.pi * frac)), out)
    elif kind == "linear":
        out = np.where(after, min_ratio + (1 - min_ratio) * (1 - frac), out)
    elif kind == "inverse_sqrt":
        out = np.where(after, np.sqrt(max(warmup, 1) / np.maximum(x, 1)), out)
    return out


def as_number(v: Any) -> float | None:
    """A log value as a float, or None (booleans, null and text are not numbers), for every reader."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


_num = as_number


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a log.jsonl; lines that are not JSON objects (a partial last line) are skipped, a binary
    or non-UTF-8 file is a RunError (an unreadable log must never read as a log without problems)."""
    from .sources import json_lines

    p = Path(path)
    if not p.is_file():
        raise RunError("no log.jsonl: not a run folder, or training has not started", file=str(p))
    return json_lines(p)


def build_series(records: list[dict[str, Any]], config: dict[str, Any] | None = None) -> RunSeries:
    """Sort, de-duplicate (a resumed run re-logs steps: last record wins) and split the records.

    `config` is the run's config as a dict (or a TrainConfig); missing keys are simply unknown.
    """
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    train: dict[int, dict] = {}
    evals: dict[str, dict[int, float]] = {}
    events: list[dict[str, Any]] = []
    for r in records:
        step = _num(r.get("step"))
        if step is None or not math.isfinite(step):
            continue
        kind = r.get("type")
        if kind == R.TYPE_TRAIN:
            train[int(step)] = r
        elif kind == R.TYPE_EVAL:
            v = _num(r.get("eval_loss"))
            if v is not None and math.isfinite(v):
                evals.setdefault(str(r.get("split", "val")), {})[int(step)] = v
        elif kind == R.TYPE_EVENT:
            events.append(r)

    steps, loss, lr, gn, ep, bad = [], [], [], [], [], []
    for s in sorted(train):
        r = train[s]
        v = _num(r.get("loss"))
        if v is None:
            continue
        if not math.isfinite(v):
            bad.append(s)
            continue
        steps.append(s)
        loss.append(max(v, 1e-8))
        lr.append(_num(r.get("lr")))
        g = _num(r.get("grad_norm"))
        gn.append(g if g is not None and math.isfinite(g) else math.nan)
        ep.append(_num(r.get("epoch")))

    def arr(xs: list[float | None]) -> np.ndarray | None:
        if not xs or any(x is None for x in xs):
            return None
        a = np.asarray(xs, float)
        return a if np.all(np.isfinite(a)) else None

    grad = np.asarray(gn, float) if gn and np.isfinite(gn).any() else None
    return RunSeries(
        steps=np.asarray(steps, float), loss=np.asarray(loss, float), lr=arr(lr), grad_norm=grad,
        epoch=arr(ep), nonfinite_steps=bad,
        evals={k: (np.asarray(sorted(v), float), np.asarray([v[s] for s in sorted(v)], float))
               for k, v in evals.items()},
        events=sorted(events, key=lambda e: _num(e.get("step")) or 0.0),
        config=dict(config or {}),
    )
