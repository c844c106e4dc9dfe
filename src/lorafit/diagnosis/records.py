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
# Steps and step counts beyond this are not counts any trainer reached (float64 holds integers exactly
# up to 2**53): a value like 1e300 would only overflow the statistics built on it.
MAX_COUNT = 2 ** 53
# A mean cross-entropy (nats per token) stays below ln(vocabulary) ~ 12 for any model that learned
# anything and below a few hundred when diverged; far beyond is not a loss, and sums of such values
# (means, regressions) would overflow float64.
MAX_EVAL_LOSS = 1e6


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
    unusable_evals: int = 0                # eval records skipped: a loss that is not a positive number

    # --- facts that fall back from config to the start event to the log itself ----------------
    def cfg(self, key: str, default: Any = None) -> Any:
        v = self.config.get(key)
        if v is None:
            for e in self.events:
                if e.get("event") == R.START and e.get(key) is not None:
                    return e[key]
            return default
        return v

    def count(self, key: str) -> int | None:
        """A positive step count from the config or start event (total_steps, logging_steps, ...); a value
        that is not a finite count (Infinity, NaN, 1e300, text) is unknown, as if it were absent."""
        v = self.cfg(key)
        return as_count(v, positive=True) if isinstance(v, (int, float)) else None

    @property
    def last_step(self) -> int:
        cands = [int(self.steps[-1])] if len(self.steps) else []
        cands += [int(s[-1]) for s, _ in self.evals.values() if len(s)]
        cands += [c for c in (as_count(e.get("step")) for e in self.events) if c is not None]
        return max(cands, default=0)

    @property
    def total_steps(self) -> int:
        return self.count("total_steps") or self.last_step

    @property
    def logging_steps(self) -> int:
        """Steps per logged record: the configured value unless it is longer than the run (a logging
        interval of 1e300 steps would make every per-step figure absurd), else the log's own spacing."""
        v = self.count("logging_steps")
        if v is not None and v <= max(self.last_step, 1):
            return v
        d = np.diff(self.steps)
        return max(1, int(np.median(d))) if len(d) else 1

    @property
    def eval_steps(self) -> int:
        v = self.count("eval_steps")
        if v is not None:
            return v
        diffs = [np.median(np.diff(s)) for s, _ in self.evals.values() if len(s) > 1]
        return int(min(diffs)) if diffs else 0

    @property
    def peak_lr(self) -> float | None:
        v = as_number(self.config.get("learning_rate"))
        if v is not None and 0 < v < math.inf:
            return float(v)
        return float(np.max(self.lr)) if self.lr is not None and len(self.lr) else None

    @property
    def examples_per_step(self) -> int | None:
        """Examples per optimizer step (times the data-parallel world size when the start event says)."""
        b = as_count(self.config.get("batch_size"), positive=True)
        ga = as_count(self.config.get("gradient_accumulation_steps") or 1, positive=True)
        world = as_count(self.cfg("world_size", 1), positive=True)
        if b is None or ga is None or world is None:
            return None
        return b * ga * world

    def warmup_steps(self) -> int | None:
        """Effective warmup: recorded by train (or given by the launch config), or read off the LR curve
        (where it first peaks). None when it cannot be told: see warmup_bound."""
        w = self.cfg("effective_warmup_steps")
        if isinstance(w, (int, float)) and as_count(w) is not None:
            return as_count(w)
        if self.lr is not None and len(self.lr) > 2 and np.max(self.lr) > 0:
            i = int(np.argmax(self.lr >= 0.95 * np.max(self.lr)))
            if i > 0:
                return int(self.steps[i])
            # Already at its peak in the first record: the warmup ended somewhere before that step, so
            # it is 0 only when that record is step 1 (a 90-step warmup logged every 100 steps is not 0).
            return 0 if self.steps[0] <= 1 else None
        return None

    def warmup_bound(self) -> int | None:
        """The most the warmup can have been when warmup_steps cannot tell: the first logged step, when
        the LR is already at its peak there."""
        if self.warmup_steps() is None and self.lr is not None and len(self.lr) > 2 and np.max(self.lr) > 0:
            return int(self.steps[0]) if self.lr[0] >= 0.95 * np.max(self.lr) else None
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


def as_count(v: Any, positive: bool = False) -> int | None:
    """A log or config value as a step or step count, or None: non-numbers, NaN, infinities and values
    beyond MAX_COUNT are not counts (the caller treats them as absent or skips the record)."""
    f = as_number(v)
    if f is None or not math.isfinite(f) or abs(f) > MAX_COUNT or (positive and f < 1):
        return None
    return int(f)


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
    unusable = 0
    for r in records:
        step = as_count(r.get("step"))
        if step is None:   # no usable step (missing, text, NaN, inf, 1e300): the record is skipped
            continue
        kind = r.get("type")
        if kind == R.TYPE_TRAIN:
            train[step] = r
        elif kind == R.TYPE_EVAL:
            v = _num(r.get("eval_loss"))
            # Skipped unless positive and below MAX_EVAL_LOSS: every validation test is relative (x% above
            # the best), and a rise from a loss of 0 has no size; floored like training losses.
            if v is not None and 0 < v < MAX_EVAL_LOSS:
                evals.setdefault(str(r.get("split", "val")), {})[step] = max(v, 1e-8)
            else:
                unusable += 1
        elif kind == R.TYPE_EVENT:
            events.append({**r, "step": step})

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
        events=sorted(events, key=lambda e: e["step"]),
        config=dict(config or {}), unusable_evals=unusable,
    )
