"""Detectors that read the training curve: spikes and noise, divergence/NaN, flat loss, gradient
explosions, and a warmup too short for the learning rate.

Each detector returns a Finding or None. Thresholds are module constants; docs/diagnose.md gives the
reasoning behind each. Loss is analysed in log space (see stats.py for why).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..rundir import EARLY_STOP, NONFINITE_SKIP
from .findings import Finding
from .patches import lower_lr, safer_clipping, longer_warmup, round_sig
from .records import RunSeries
from .stats import curvature_sigma, diff_sigma, left_median, right_median, rolling_diff_sigma, rolling_median, odd

SPIKE_Z = 6.0              # a spike stands this many local noise-sigmas above the curve on both sides
SPIKE_MIN_RATIO = 1.3      # ... and at least 30% above it: smaller bumps are not worth acting on
SPIKE_CRITICAL_RATIO = 5.0
NOISE_STEP_HIGH = 0.25     # per-step relative loss noise above which the curve is called noisy
PER_EXAMPLE_SPREAD_MAX = 1.5   # implied per-example spread of log-loss that batch sampling can explain
DIVERGE_FROM_MIN = math.log(1.5)   # sustained loss level 50% above its best (and still there) ...
DIVERGE_RECOVERED = math.log(2.0)  # ... or twice its best, even if it came back down later
DIVERGE_FROM_START = math.log(1.5)  # or sustained 50% above where training started
FLAT_DROP = 0.05           # loss fell by less than 5% over the whole run ...
FLAT_DROP_BOUND = 0.15     # ... and we are confident it fell by less than 15%
LOW_LR = 5e-5              # below this, a flat LoRA loss is most likely the learning rate
GRAD_SPIKE = math.log(10.0)     # a gradient norm 10x its recent median
GRAD_SUSTAINED = math.log(10.0)  # or a sustained 10x rise of its rolling median
WARMUP_SHORT_FRAC = 0.02   # warmup shorter than 2% of the run (and than 10 steps) is "short"
WARMUP_BUMP = math.log(1.15)    # early loss rising 15% above its first logged value ...
WARMUP_Z = 4.0                  # ... by 4 noise-sigmas of the difference


def spike_window(n: int) -> int:
    """Records on each side that define the local trend: ~3% of the log, 5 to 25 records."""
    return int(np.clip(round(n / 30), 5, 25))


def find_spikes(s: RunSeries) -> list[dict[str, Any]]:
    """Loss spikes: records far above the local trend and above the level the curve returns to.

    The trend at a point is the mean of the medians just before and just after it, which cancels a
    locally linear slope (the steep early descent would otherwise hide spikes); requiring the point to
    stand above the level after it as well means a lasting rise (divergence) is not a spike. Grouping
    neighbouring flagged records reports a spike once, at its peak.
    """
    x = np.log(s.loss)
    n = len(x)
    if n < 8:
        return []
    h = spike_window(n)
    left, right = left_median(x, h), right_median(x, h)
    r = np.where(np.isfinite(right), np.minimum(x - (left + right) / 2, x - right), x - left)
    sig = np.maximum(rolling_diff_sigma(x, 4 * h), max(1e-3, 0.3 * diff_sigma(x)))
    z = r / sig
    flagged = np.flatnonzero(np.isfinite(z) & (z >= SPIKE_Z) & (r >= math.log(SPIKE_MIN_RATIO)))
    spikes: list[dict[str, Any]] = []
    group: list[int] = []
    for i in list(flagged) + [None]:
        if group and (i is None or i - group[-1] > 2):
            p = max(group, key=lambda k: r[k])
            spikes.append({"step": int(s.steps[p]), "loss": float(s.loss[p]), "trend": float(math.exp(x[p] - r[p])),
                           "ratio": float(math.exp(r[p])), "z": float(z[p])})
            group = []
        if i is not None:
            group.append(int(i))
    return spikes


def detect_fluctuation(s: RunSeries, spikes: list[dict[str, Any]], judge_noise: bool = True) -> Finding | None:
    """Spikes (warning) or, without spikes, a loss noisier than its batch size explains.

    `judge_noise` is off when a divergence already explains the erratic curve.
    """
    if len(s.loss) < 8:
        return None
    noise = curvature_sigma(np.log(s.loss))
    per_step = noise * math.sqrt(s.logging_steps)   # a logged value averages logging_steps steps
    eps = s.examples_per_step
    spread = per_step * math.sqrt(eps) if eps else None
    evidence: dict[str, Any] = {"noise_per_record": noise, "noise_per_step": per_step,
                                "examples_per_step": eps, "implied_per_example_spread": spread}
    if spikes:
        worst = max(spikes, key=lambda p: p["ratio"])
        evidence["spikes"] = [{k: p[k] for k in ("step", "ratio", "z", "loss", "trend")} for p in spikes]
        patch = {**lower_lr(s, 0.5), **safer_clipping(s), **longer_warmup(s)}
        if eps is not None and eps < 16:
            patch["gradient_accumulation_steps"] = int(s.config.get("gradient_accumulation_steps") or 1) * 2
        severe = worst["ratio"] >= SPIKE_CRITICAL_RATIO or len(spikes) >= 5
        return Finding(
            "fluctuation", "critical" if severe else "warning",
            f"{len(spikes)} loss spike{'s' if len(spikes) > 1 else ''}, up to {worst['ratio']:.1f}x the local trend "
            f"at step {worst['step']}",
            "The training loss jumped far above the level both before and after "
            f"(robust z >= {SPIKE_Z:g} against the local noise of ±{100 * noise:.0f}% per logged value). "
            "Spikes come from updates that were too large for the loss surface: a high learning rate, "
            "a short warmup, a small batch that happened to be unusual, or unclipped gradients.",
            "Lower the learning rate, keep gradient clipping at 1.0, warm up for ~10% of the steps, and "
            "average over more examples per update (gradient_accumulation_steps).",
            steps=[p["step"] for p in spikes], evidence=evidence, config_patch=patch)
    if not judge_noise:
        return None
    too_noisy = spread is not None and spread > PER_EXAMPLE_SPREAD_MAX and per_step > NOISE_STEP_HIGH
    if per_step <= NOISE_STEP_HIGH and not too_noisy:
        return None
    ga = int(s.config.get("gradient_accumulation_steps") or 1)
    if too_noisy:
        return Finding(
            "fluctuation", "warning",
            f"training loss noisier than its batch size explains (±{100 * per_step:.0f}% per step)",
            f"With {eps} examples per optimizer step, batch sampling alone would give about "
            f"±{100 * PER_EXAMPLE_SPREAD_MAX / math.sqrt(eps):.0f}% or less; the rest is the optimizer "
            "overshooting, which is what a learning rate that is too high looks like.",
            "Lower the learning rate.", evidence=evidence, config_patch=lower_lr(s, 0.5))
    k = min(8, 2 ** math.ceil(math.log2(max(2.0, (per_step / 0.12) ** 2))))
    return Finding(
        "fluctuation", "info",
        f"noisy training loss (±{100 * per_step:.0f}% per step)",
        f"Each optimizer step sees {eps or 'few'} examples, so the loss of a step varies a lot with which "
        "examples it drew; this is expected sampling noise, not instability, but it also makes each "
        "update noisy. Noise falls with the square root of the examples per step.",
        f"If the smoothed curve is unclear, average over {k}x more examples per step "
        "(gradient_accumulation_steps); the learning rate can stay.",
        evidence=evidence, config_patch={"gradient_accumulation_steps": ga * k})


def _level(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Sustained loss level: a centred rolling median wide enough that noise and short spikes vanish."""
    n = len(x)
    sig = diff_sigma(x)
    lo = max(9, n // 20) if n >= 36 else 5   # longer than any spike's recovery
    w = odd(np.clip((1.25 * sig / 0.05) ** 2, lo, max(lo, n // 4)))
    return rolling_median(x, w // 2, w // 2, w // 2 + 1), w


def detect_divergence(s: RunSeries, early_end: float | None = None) -> Finding | None:
    """Non-finite losses, or a sustained loss level far above its best or its start.

    An early excursion that recovers (before `early_end`) is a warmup problem, not divergence.
    """
    bad = sorted({int(e["step"]) for e in s.events if e.get("event") == NONFINITE_SKIP
                  and isinstance(e.get("step"), (int, float))} | set(s.nonfinite_steps))
    x = np.log(s.loss)
    evidence: dict[str, Any] = {}
    steps: list[int] = []
    rise_found = unrecovered = False
    if len(x) >= 10:
        lev, w = _level(x)
        runmin = np.fmin.accumulate(np.where(np.isfinite(lev), lev, np.inf))
        k = int(np.clip(w // 2, 3, max(3, len(x) // 5)))
        start = float(np.median(x[:k]))
        up_min, up_start = lev - runmin, lev - start
        hit = np.flatnonzero(np.isfinite(lev) & ((up_min >= DIVERGE_FROM_MIN) | (up_start >= DIVERGE_FROM_START)))
        if len(hit):
            peak = int(hit[np.argmax(up_min[hit])])
            final = float(lev[np.flatnonzero(np.isfinite(lev))[-1]])
            unrecovered = final - runmin[peak] >= math.log(1.2)
            early = early_end is not None and s.steps[peak] <= early_end
            big = unrecovered or up_min[peak] >= DIVERGE_RECOVERED or up_start[peak] >= DIVERGE_FROM_START
            if big and (not early or unrecovered):
                below = np.flatnonzero(up_min[:peak + 1] <= math.log(1.1))
                onset = int(below[-1]) if len(below) else 0
                rise_found = True
                steps = [int(s.steps[onset]), int(s.steps[peak])]
                evidence.update(start_loss=math.exp(start), best_level=math.exp(runmin[peak]),
                                peak_level=math.exp(lev[peak]), final_level=math.exp(final),
                                rise_from_best=math.exp(up_min[peak]), recovered=not unrecovered)
    ended_bad = bool(bad) and (not len(s.steps) or bad[-1] > s.steps[-1])
    if ended_bad and not rise_found and len(x) >= 5:
        # The run died in NaN, possibly before a rise could look "sustained": find the final climb.
        lev5 = rolling_median(x, 2, 2, 3)
        bottom = int(np.nanargmin(lev5))
        tail = float(np.median(x[-3:]))
        if tail - lev5[bottom] >= math.log(1.3):
            rise_found = unrecovered = True
            steps = [int(s.steps[bottom]), int(s.steps[-1])]
            evidence.update(best_level=math.exp(lev5[bottom]), final_level=math.exp(tail),
                            rise_from_best=math.exp(tail - lev5[bottom]), recovered=False)
    if not bad and not rise_found:
        return None
    evidence["nonfinite_steps"] = bad[:50]
    evidence["nonfinite_count"] = len(bad)
    limit = int(s.config.get("max_nonfinite_steps") or 3)
    stopped = any(e.get("event") == EARLY_STOP and "nonfinite" in str(e.get("reason", "")) for e in s.events)
    critical = (rise_found and unrecovered) or stopped or ended_bad or len(bad) >= limit
    patch = {**lower_lr(s, 0.3), **safer_clipping(s), **longer_warmup(s)}
    if bad and s.config.get("dtype") == "float16":
        patch["dtype"] = "bfloat16"
    what = []
    if rise_found:
        what.append(f"loss rose to {evidence['rise_from_best']:.1f}x its best level"
                    + ("" if unrecovered else " and then recovered"))
    if bad:
        what.append(f"{len(bad)} non-finite (NaN/inf) loss or gradient step{'s' if len(bad) > 1 else ''}")
    return Finding(
        "divergence", "critical" if critical else "warning", "; ".join(what),
        "A sustained rise of the training loss (not a single spike) or NaN/inf values mean the updates "
        "pushed the weights into a region where the loss explodes: the learning rate is too high for "
        "this model and data, warmup too short, gradients unclipped, or float16 overflowed.",
        "Restart with a lower learning rate (about a third), gradient clipping at 1.0, a ~10% warmup"
        + (", and bfloat16 instead of float16" if "dtype" in patch else "") + ".",
        steps=list(dict.fromkeys(steps + bad[:20])), evidence=evidence, config_patch=patch)


def detect_flat_loss(s: RunSeries) -> Finding | None:
    """Loss that hardly moves over the whole run: almost always a learning rate that is too low."""
    x = np.log(s.loss)
    n = len(x)
    if n < 10 or s.steps[-1] - s.steps[0] < 50:
        return None
    k = int(np.clip(n // 5, 3, 500))
    first, last = _trimmed_mean(x[:k]), _trimmed_mean(x[-k:])
    drop = 1 - math.exp(last - first)
    se = diff_sigma(x) * math.sqrt(2.0 / k)
    bound = 1 - math.exp(-(first - last + 2 * se))
    if drop >= FLAT_DROP or bound >= FLAT_DROP_BOUND:
        return None
    lr = s.peak_lr
    evidence = {"loss_start": math.exp(first), "loss_end": math.exp(last), "drop": drop, "drop_upper_bound": bound,
                "peak_lr": lr, "warmup_steps": s.warmup_steps(), "total_steps": s.total_steps}
    warm = s.warmup_steps() or 0
    if math.exp(first) < 0.3:
        return Finding("lr_too_low", "info", f"loss flat at {math.exp(first):.2f} (already low)",
                       "The loss started low and stayed: the model already predicts this data well, so there "
                       "is little left to learn.", "Nothing to fix unless the outputs are wrong.", evidence=evidence)
    new_lr = round_sig(max(lr * 10, 1e-4) if lr and lr < LOW_LR else (lr or 1e-4) * 3)
    patch: dict[str, Any] = {"learning_rate": min(new_lr, 1e-3)}
    why = (f"The peak learning rate is {lr:g}, low for LoRA (typically 1e-4 to 3e-4): the adapter's updates "
           "are too small to change the model's predictions." if lr and lr < LOW_LR else
           "A LoRA fine-tune normally lowers the training loss by a quarter or more; a flat curve means the "
           "updates are too small (learning rate) or there is nothing to learn (check that the answers are "
           "in the labels and not masked).")
    if s.total_steps and warm >= 0.5 * s.total_steps:
        why += f" Warmup takes {warm} of {s.total_steps} steps, so the LR spends most of the run below its peak."
        patch.update({"warmup_ratio": 0.1, "warmup_steps": min(20, max(1, s.total_steps // 10))})
    return Finding(
        "lr_too_low", "warning", f"training loss flat: fell by only {100 * drop:.1f}% over {int(s.steps[-1])} steps",
        why, f"Raise learning_rate to {patch['learning_rate']:g}.", steps=[int(s.steps[0]), int(s.steps[-1])],
        evidence=evidence, config_patch=patch)


def _trimmed_mean(x: np.ndarray) -> float:
    x = np.sort(x)
    cut = len(x) // 10
    return float(np.mean(x[cut: len(x) - cut] if len(x) > 2 * cut else x))


def detect_grad_explosion(s: RunSeries, explained: list[tuple[float, float]] = ()) -> Finding | None:
    """Gradient norms 10x their recent median, or a sustained 10x rise (pre-clipping norms).

    Gradient spikes inside `explained` step ranges (a loss spike, an unstable warmup, a divergence)
    belong to that finding and are not reported twice.
    """
    g = s.grad_norm
    if g is None:
        return None
    ok = np.isfinite(g) & (g > 0)
    if ok.sum() < 8:
        return None
    steps, lg = s.steps[ok], np.log(g[ok])
    n = len(lg)
    h = spike_window(n)
    jump = lg - left_median(lg, h)
    spikes = np.flatnonzero(np.isfinite(jump) & (jump >= GRAD_SPIKE))
    spikes = np.array([i for i in spikes if not any(lo <= steps[i] <= hi for lo, hi in explained)], int)
    lev = rolling_median(lg, odd(max(5, n / 15)) // 2, odd(max(5, n / 15)) // 2, 3)
    skip = max(3, n // 10)   # LoRA's B starts at zero: norms legitimately grow in the first steps
    runmin = np.fmin.accumulate(np.where(np.isfinite(lev[skip:]), lev[skip:], np.inf))
    rise = lev[skip:] - runmin if n > skip else np.array([])
    sustained = rise.size > 0 and np.nanmax(rise) >= GRAD_SUSTAINED
    if sustained and any(lo <= steps[skip + int(np.nanargmax(rise))] <= hi for lo, hi in explained):
        sustained = False
    if not len(spikes) and not sustained:
        return None
    evidence: dict[str, Any] = {"median_grad_norm": float(np.exp(np.median(lg))), "max_grad_norm_seen": float(g[ok].max()),
                                "spikes": [{"step": int(steps[i]), "ratio": float(np.exp(jump[i]))} for i in spikes[:20]]}
    where = [int(steps[i]) for i in spikes[:20]]
    if sustained:
        i = skip + int(np.nanargmax(rise))
        evidence["sustained_rise"] = float(np.exp(np.nanmax(rise)))
        where.append(int(steps[i]))
    clip = s.config.get("max_grad_norm")
    clipped = isinstance(clip, (int, float)) and clip > 0
    worst = max([p["ratio"] for p in evidence["spikes"]] + [evidence.get("sustained_rise", 0)])
    return Finding(
        "grad_explosion", "critical" if worst >= 100 or (sustained and not clipped) else "warning",
        f"gradient norm up to {worst:.0f}x its typical level",
        "Exploding gradients precede loss spikes and divergence; "
        + ("clipping at {:g} limits the step, but the learning rate is high for this curvature.".format(clip)
           if clipped else "gradient clipping is off, so every such step moves the weights by that much."),
        "Keep gradient clipping at 1.0 and lower the learning rate.",
        steps=sorted(set(where)), evidence=evidence, config_patch={**safer_clipping(s), **lower_lr(s, 0.5)})


def early_window_end(s: RunSeries) -> float:
    """Steps in which warmup instability shows: twice the warmup, and at least 5% of the run."""
    w = s.warmup_steps() or 0
    return max(2.0 * w, 0.05 * s.total_steps, 10.0 * s.logging_steps)


def detect_warmup(s: RunSeries, spikes: list[dict[str, Any]]) -> Finding | None:
    """A warmup too short for the learning rate: short by the numbers, and (for a warning) early
    instability seen in the log: the loss rising above its first value, spikes or gradient spikes."""
    w, total, lr = s.warmup_steps(), s.total_steps, s.peak_lr
    # Logged too coarsely to see the warmup (the LR is at its peak in the first record): it was at most
    # that many steps, which still tells a short warmup when the first record comes early enough.
    at_most = w is None and s.warmup_bound() is not None
    w = s.warmup_bound() if w is None else w
    if w is None or not total or len(s.loss) < 5:
        return None
    limit = max(10, WARMUP_SHORT_FRAC * total)
    if w > limit or (w == limit and not at_most):   # "at most 10" is short enough to note
        return None
    end = early_window_end(s)
    x = np.log(s.loss)
    early = (s.steps <= end) & (np.arange(len(x)) > 0)
    sig = diff_sigma(x)
    # Rise above the first logged loss (the untrained model's): a wide bump shows in the 3-record
    # median (3 sigma), a narrow one in single records (4 sigma of a difference of two records).
    lev = rolling_median(x, 1, 1, 2)
    wide = early & (lev - x[0] >= max(WARMUP_BUMP, 3 * sig))
    narrow = early & (x - x[0] >= max(WARMUP_BUMP, WARMUP_Z * math.sqrt(2) * sig))
    bump = float(np.max(x[early] - x[0])) if early.any() else 0.0
    bumped = bool(wide.any() or narrow.any())
    early_spikes = [p for p in spikes if p["step"] <= end]
    evidence: dict[str, Any] = {"warmup_steps": w, "warmup_at_most": at_most, "total_steps": total, "peak_lr": lr,
                                "early_window_end": int(end),
                                "early_rise_over_first_loss": math.exp(bump),
                                "early_spike_steps": [p["step"] for p in early_spikes]}
    g = s.grad_norm
    if g is not None and early.any():
        ge = g[early & np.isfinite(g)]
        if len(ge) >= 3:
            evidence["early_grad_norm_max_over_median"] = float(ge.max() / np.median(g[np.isfinite(g)]))
    unstable = bumped or bool(early_spikes) or evidence.get("early_grad_norm_max_over_median", 0) >= 10
    if not unstable and not (lr is not None and lr >= 1e-4):
        return None
    patch = longer_warmup(s, force=True)
    at = [p["step"] for p in early_spikes]
    if bumped:
        at.insert(0, int(s.steps[early][int(np.argmax(x[early]))]))
    return Finding(
        "warmup_too_short", "warning" if unstable else "info",
        f"warmup of {'at most ' if at_most else ''}{w} steps" + (f" for a peak LR of {lr:g}" if lr else "") + (" with early instability" if unstable else ""),
        "Adam's second-moment estimates are poor in the first steps, so a full learning rate from the start "
        "makes the first updates too large"
        + (f": the loss rose to {math.exp(bump):.2f}x its first value early on." if bumped else
           "; the log shows early spikes." if unstable else "; this run did not visibly suffer."),
        f"Warm up for ~10% of the steps (warmup_ratio 0.1, at least {patch.get('warmup_steps', 20)} steps).",
        steps=sorted(set(at)), evidence=evidence, config_patch=patch)
