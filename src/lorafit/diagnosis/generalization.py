"""Detectors that read the validation curves and eval metrics: overfitting, plateau, forgetting,
plus the run-setup checks (truncated examples, no validation at all).

Validation loss is computed on the same fixed examples every time, so its noise is small and a few
evaluations (3-10) already show a trend; the tests below still use a trend over several points
(Mann-Kendall, regression slope with its standard error), never one comparison.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..rundir import EARLY_STOP, START
from .findings import Finding
from .patches import DEFAULTS, round_sig
from .records import RunSeries, as_count
from .stats import mann_kendall, ols_slope, rolling_median, t_quantile

OVERFIT_RISE = 0.02        # validation loss 2% above its best ...
OVERFIT_CLEAR_RISE = 0.05  # (5% is enough on its own, even from one evaluation after the best)
OVERFIT_GAP_GROWTH = 1.05  # ... and the train/validation gap must widen with it
HIGH_LR_FACTOR = 5         # peak LR >= 5x the usual LoRA LR (1e-4): named as the cause of fast memorising
OVERFIT_LEVEL_RISE = 0.015  # smaller rises must also hold between smoothed levels
OVERFIT_CRITICAL = 0.10
TRAIN_FELL = 0.10          # a rise from the first evaluation is overfitting only if training fell 10%+ meanwhile
PLATEAU_REL = 0.01         # less than 1% improvement over the final stretch ...
PLATEAU_BOUND = 0.03       # ... and confidently less than 3% (regression slope's 90% upper bound)
PLATEAU_SPAN = 0.25        # the stretch covers at least a quarter of the training progress
PLATEAU_BEFORE = 0.02      # after the validation loss fell by 2%+ (else it never learned: lr_too_low)
FORGET_WATCH = 0.02        # general-domain loss up 2%: info (a drift worth watching)
FORGET_LOSS = 0.05         # general-domain loss up 5% (perplexity up ~5%+): warning
FORGET_CRITICAL = 0.15
FORGET_ROUGE_POINTS = 2.0  # general-domain ROUGE-L down 2 points (and 5% relative)
FORGET_BENCH_POINTS = 2.0  # MMLU/CMMLU accuracy down 2 points, its paired 95% interval below 0 ...
FORGET_BENCH_CRITICAL = 5.0  # ... 5 points: critical


def _epoch_at(s: RunSeries, step: float) -> float | None:
    if s.epoch is None or not len(s.steps):
        return None
    return float(np.interp(step, s.steps, s.epoch))


def _gap_width(s: RunSeries) -> int:
    """Steps of train records that stand for the train loss at an evaluation (>= 10 records)."""
    return max(10 * s.logging_steps, s.eval_steps // 2 or 1)


def _train_slope(s: RunSeries, a: float, b: float) -> float:
    """Regression slope of the log training loss between steps a and b (0 when too few records)."""
    m = (s.steps >= a) & (s.steps <= b)
    if m.sum() < 3:
        return 0.0
    return ols_slope(s.steps[m], np.log(s.loss[m]))[0]


def _train_fell(s: RunSeries, a: float, b: float) -> bool:
    """The training loss level fell by TRAIN_FELL or more from step a to step b."""
    width = _gap_width(s)
    ta, tb = s.train_level_at(a, width), s.train_level_at(b, width)
    return ta is not None and tb is not None and tb <= ta * (1 - TRAIN_FELL)


def detect_overfitting(s: RunSeries) -> list[Finding]:
    """Validation loss rising from its best while the training loss keeps falling (per split)."""
    out = []
    for split in s.validation_splits():
        st, y = s.evals[split]
        b = int(np.argmin(y))
        after = y[b + 1:]
        if not len(after):
            continue
        if b == 0 and not _train_fell(s, st[0], st[-1]):
            continue  # never better than its first evaluation and the training loss did not fall either: the
            # run failed to learn (divergence), it did not overfit. With a falling training loss it did.
        rise = float(y[-1] / y[b] - 1)
        # A smaller rise must be a trend (Mann-Kendall needs 4+ points to reach significance; with two
        # evaluations after the best both must stand clearly above it) and must hold level to level:
        # the minimum of noisy evaluations is biased low and the last one is a single draw, so the
        # median of the last (up to) 3 is compared with the minimum of the 3-point-median curve.
        level_rise = float(np.median(y[-min(3, len(after)):]) / np.min(rolling_median(y, 1, 1, 1)) - 1)
        _, z = mann_kendall(y[b:])
        trend = (z >= 1.64 if len(after) >= 3 else
                 len(after) == 2 and bool(np.all(after >= y[b] * (1 + OVERFIT_RISE / 2))))
        if not (rise >= OVERFIT_CLEAR_RISE or (rise >= OVERFIT_RISE and level_rise >= OVERFIT_LEVEL_RISE and trend)):
            continue
        if _train_slope(s, st[b], st[-1]) > 0:
            continue  # train loss not falling: instability (divergence) or noise, not overfitting
        tb, te = s.train_level_at(st[b], _gap_width(s)), s.train_level_at(st[-1], _gap_width(s))
        best_step = int(st[b])
        ev: dict[str, Any] = {"split": split, "best_step": best_step, "best_eval_loss": float(y[b]),
                              "final_eval_loss": float(y[-1]), "rise_from_best": rise, "trend_z": z,
                              "evals_after_best": len(after)}
        if tb is not None and te is not None:
            ev.update(train_loss_at_best=tb, train_loss_final=te, gap_at_best=float(y[b] / tb),
                      gap_final=float(y[-1] / te))
            if ev["gap_final"] < ev["gap_at_best"] * OVERFIT_GAP_GROWTH:
                continue  # validation rose but training rose with it: instability, not memorising
        epoch = _epoch_at(s, best_step)
        # With early stopping on (or an early_stop event) train restored the best adapter: the result is
        # fine, only the steps after the best were wasted.
        restored = bool(s.config.get("early_stopping_patience")) or any(e.get("event") == EARLY_STOP for e in s.events)
        patch: dict[str, Any] = {} if restored else {"early_stopping_patience": 3}
        if epoch:
            ev["epoch_at_best"] = epoch
            patch["num_epochs"] = max(0.1, math.ceil(epoch * 10) / 10)
        else:
            patch["max_steps"] = best_step
        patch["lora_dropout"] = round(min(0.3, float(s.config.get("lora_dropout", DEFAULTS["lora_dropout"])) + 0.05), 3)
        if not s.config.get("weight_decay"):
            patch["weight_decay"] = 0.01
        if not s.config.get("augment"):
            patch["augment"] = ["prompt_variants", "word_dropout"]
        # A LoRA LR far above the usual 1e-4..2e-4 makes the adapter memorise in an epoch or two: the LR
        # is then the cause, not only the epochs (a 1e-4 run of the same data kept improving).
        lr = s.peak_lr
        high_lr = lr is not None and lr >= HIGH_LR_FACTOR * DEFAULTS["learning_rate"]
        if high_lr:
            patch["learning_rate"] = round_sig(lr / 10)
            ev["peak_lr"] = lr
        gap = f"; the train/validation gap grew from {ev['gap_at_best']:.2f}x to {ev['gap_final']:.2f}x" if "gap_final" in ev else ""
        ev["best_adapter_restored"] = restored
        # Best at the first evaluation: the true best may lie before it (evaluate earlier or more often).
        where = f"at {'its first evaluation, ' if b == 0 else ''}step {best_step}"
        few = f" (only {len(y)} evaluations)" if len(y) < 3 else ""
        out.append(Finding(
            "overfitting", "critical" if rise >= OVERFIT_CRITICAL and not restored else "warning",
            f"'{split}' loss best {where} ({y[b]:.3f}), then rose {100 * rise:.1f}% to {y[-1]:.3f}{few}",
            "The model keeps lowering its training loss by memorising the training examples while getting "
            f"worse on unseen ones{gap}. "
            + (f"Early stopping restored the step-{best_step} adapter, so the result is the best one, but the "
               "steps after it were wasted and more data or regularisation would push the best lower."
               if restored else f"Everything after step {best_step} made the adapter worse."),
            (f"The peak LR {lr:g} is {lr / DEFAULTS['learning_rate']:g}x the usual LoRA LR of "
             f"{DEFAULTS['learning_rate']:g}: at that rate the adapter memorises within a few epochs; lower it "
             f"to {patch['learning_rate']:g}. " if high_lr else "")
            + f"Stop at the best step (early_stopping_patience restores it; or train {patch.get('num_epochs', best_step)} "
            f"{'epochs' if 'num_epochs' in patch else 'steps'}), add data or augmentation, and regularise "
            "(lora_dropout, weight_decay).",
            steps=[best_step, int(st[-1])], evidence=ev, config_patch=patch))
    return out


def detect_plateau(s: RunSeries, skip: set[str]) -> list[Finding]:
    """Validation loss that was falling and no longer is, over a final stretch of evaluations."""
    out = []
    for split in s.validation_splits():
        if split in skip:
            continue
        st, y = s.evals[split]
        n = len(y)
        if n < 4:
            continue
        px = s.progress(st)   # judged in LR-integral units: flattening as the LR anneals is expected
        flat = [c for c in range(n - 3) if _is_flat(px[c:], y[c:])]
        if not flat:   # the longest final stretch (>= 4 evaluations) whose fitted trend is flat
            continue
        j = flat[0]
        rising = float(np.median(y[-3:]) / np.min(rolling_median(y[j:], 1, 1, 1)) - 1) >= OVERFIT_LEVEL_RISE
        if px[-1] - px[j] < PLATEAU_SPAN * (px[-1] - px[0]) or rising:
            continue   # too short to call, or rising again at the end (overfitting's business)
        before = float(y[:j + 1].max() / y[j] - 1)
        imp, bound = _improvement(px[j:], y[j:])
        # A plateau is a change of slope: it fell before and stopped. A curve that never fell (flat loss,
        # lr_too_low) or falls slowly at one steady rate is not one.
        if before < PLATEAU_BEFORE or imp / (px[-1] - px[j]) > 0.25 * before / max(px[j] - px[0], 1e-9):
            continue
        width = _gap_width(s)
        t0, t1 = s.train_level_at(st[j], width), s.train_level_at(st[-1], width)
        train_change = None if t0 is None or t1 is None else t1 / t0 - 1
        ev = {"split": split, "since_step": int(st[j]), "evals_in_plateau": n - j, "improvement": imp,
              "improvement_upper_bound": bound, "improvement_before": before, "train_change": train_change}
        share = px[-1] - px[j]
        patch: dict[str, Any] = {}
        if train_change is not None and train_change <= -0.05:
            why = ("while the training loss still fell by {:.0f}%: the adapter is fitting the training examples "
                   "without generalising further (the step before overfitting).").format(-100 * train_change)
            fix = "Regularise (lora_dropout, weight_decay) and add more or more varied data (augment)."
            patch["lora_dropout"] = round(min(0.3, float(s.config.get("lora_dropout", 0.1)) + 0.05), 3)
            if not s.config.get("weight_decay"):
                patch["weight_decay"] = 0.01
            if not s.config.get("augment"):
                patch["augment"] = ["prompt_variants", "word_dropout"]
        else:
            why = "and the training loss is flat as well: the optimiser has stopped making progress."
            lr = s.peak_lr
            fix = "Training longer will not help; stop at the plateau"
            if lr is not None and lr <= 1e-4:
                patch["learning_rate"] = round_sig(lr * 2)
                fix += f", or try a higher learning rate ({patch['learning_rate']:g})"
            fix += "; more data (or a larger lora_rank) is what raises the ceiling."
            epoch = _epoch_at(s, st[j])
            if epoch:
                patch["num_epochs"] = max(0.1, math.ceil(epoch * 10) / 10)
        out.append(Finding(
            "plateau", "warning",
            f"'{split}' loss flat since step {int(st[j])} (improved {100 * imp:.1f}% over the last {n - j} evaluations)",
            f"Validation loss improved by {100 * before:.1f}% before step {int(st[j])} but by less than "
            f"{100 * PLATEAU_REL:g}% since (90% upper bound {100 * bound:.1f}%), over the last {100 * share:.0f}% of "
            "the training progress (learning-rate integral), " + why,
            fix, steps=[int(st[j]), int(st[-1])], evidence=ev, config_patch=patch))
    return out


def _is_flat(st: np.ndarray, y: np.ndarray) -> bool:
    imp, bound = _improvement(st, y)
    return imp < PLATEAU_REL and bound < PLATEAU_BOUND and imp > -OVERFIT_RISE


def _improvement(st: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Relative improvement over the stretch by the fitted line, and its one-sided 90% upper bound."""
    b, se = ols_slope(st, y / np.mean(y))
    span = float(st[-1] - st[0])
    imp = -b * span
    bound = imp + t_quantile(0.90, len(y) - 2) * se * span if math.isfinite(se) else math.inf
    return imp, bound


def detect_forgetting(s: RunSeries, metrics: dict[str, Any] | None) -> Finding | None:
    """General-domain loss (or ROUGE) worse after tuning than before, beyond a threshold."""
    ev: dict[str, Any] = {}
    rises = []
    if "general" in s.evals and len(s.evals["general"][1]) >= 2:
        st, y = s.evals["general"]
        rises.append(float(y[-1] / y[0] - 1))
        ev.update(general_loss_first=float(y[0]), general_loss_last=float(y[-1]), first_general_eval_step=int(st[0]),
                  general_loss_rise=rises[-1])
    # metrics.json is a side file: any part of it in another shape counts as absent, never as an error.
    g = _mapping(_mapping(_mapping(metrics).get("sets")).get("general"))
    rouge_drop = 0.0
    if g:
        lb, la = g.get("loss_before"), g.get("loss_after")
        if _is_num(lb) and _is_num(la) and lb > 0:
            rises.append(float(la / lb - 1))
            ev.update(metrics_loss_before=lb, metrics_loss_after=la, metrics_loss_rise=rises[-1])
            if _ci(g.get("loss_delta_ci95")):   # paired bootstrap over the general set's prompts (lorafit eval)
                ev.update(metrics_loss_delta_ci95=g["loss_delta_ci95"], metrics_loss_p_value=g.get("loss_p_value"))
        rb, rd = _mapping(g.get("before")).get("rouge-l"), _mapping(g.get("delta")).get("rouge-l")
        ci = _ci(_mapping(g.get("delta_ci95")).get("rouge-l"))
        if _is_num(rb) and _is_num(rd):
            scale = 1.0 if abs(rb) > 1.5 else 100.0   # llamafactory mode reports percent, standard 0-1
            # A drop whose 95% interval reaches 0 is within the prompts' sampling noise: not evidence.
            if -rd * scale >= FORGET_ROUGE_POINTS and rb and -rd / rb >= 0.05 and (ci is None or ci[1] < 0):
                rouge_drop = -rd * scale
            ev.update(rouge_l_before=rb * scale, rouge_l_delta=rd * scale)
            if ci is not None:
                ev.update(rouge_l_delta_ci95=[c * scale for c in ci])
    bench_drops = _benchmark_drops(metrics, ev)
    worst = max(rises, default=0.0)
    if worst < FORGET_LOSS and not rouge_drop and not bench_drops:
        if worst < FORGET_WATCH:
            return None
        return Finding(
            "forgetting", "info", f"general-domain loss up {100 * worst:.1f}% (below the {100 * FORGET_LOSS:g}% warning line)",
            "The adapter has started to move the model away from general text; not yet a measurable loss of "
            "ability, but it grows with more epochs or a higher learning rate.",
            "Keep an eye on it; mixing in general-domain data (general_data, general_ratio 0.2) prevents it.",
            evidence=ev)
    lr = s.peak_lr or DEFAULTS["learning_rate"]
    patch: dict[str, Any] = {}
    general_data = s.config.get("general_data") or []
    if general_data:
        patch["general_ratio"] = max(0.2, float(s.config.get("general_ratio") or 0))
    if lr > 1e-5:
        patch["learning_rate"] = 1e-5
    epochs = s.config.get("num_epochs")
    if isinstance(epochs, (int, float)) and epochs > 1:
        patch["num_epochs"] = max(1, int(epochs) // 2)
    mix = ("raise general_ratio to 0.2" if general_data else
           "set general_data to a general instruction file and general_ratio to 0.2")
    what = f"general-domain loss up {100 * worst:.1f}%" if worst >= FORGET_WATCH else ""
    if rouge_drop:
        what += ("; " if what else "") + f"general-domain ROUGE-L down {rouge_drop:.1f} points"
    for label, drop, ci in bench_drops:
        what += ("; " if what else "") + f"{label} accuracy down {drop:.1f} points [{-ci[1]:.1f}, {-ci[0]:.1f}]"
    bench_worst = max((d for _, d, _ in bench_drops), default=0.0)
    return Finding(
        "forgetting", "critical" if worst >= FORGET_CRITICAL or rouge_drop >= 5 or bench_worst >= FORGET_BENCH_CRITICAL
        else "warning", what,
        "The adapter improved the target domain at the expense of general ability (catastrophic "
        "forgetting): large, many or domain-only updates overwrite what the base model knew.",
        f"Mix general-domain data into training ({mix}), lower the learning rate to 1e-5 and train fewer "
        "epochs.",
        steps=[int(s.evals['general'][0][-1])] if "general" in s.evals else [], evidence=ev, config_patch=patch)


def _benchmark_drops(metrics: dict[str, Any] | None, ev: dict[str, Any]) -> list[tuple[str, float, list[float]]]:
    """(label, drop in points, interval of the drop) for each benchmark and shot count of ``lorafit eval
    --benchmarks`` whose accuracy fell by FORGET_BENCH_POINTS or more with the paired interval below 0
    (a drop within the questions' sampling noise is not evidence). Every accuracy goes into the evidence."""
    drops: list[tuple[str, float, list[float]]] = []
    bench = metrics.get("benchmarks") if isinstance(metrics, dict) else None
    for name, entry in bench.items() if isinstance(bench, dict) else ():
        for key, block in entry.items() if isinstance(entry, dict) else ():
            o = block.get("overall") if key.endswith("-shot") and isinstance(block, dict) else None
            if not isinstance(o, dict) or not _is_num(o.get("delta")):
                continue
            label = f"{name} {key}"
            ci = _ci(o.get("delta_ci95"))
            ev.setdefault("benchmarks", {})[label] = {k: o.get(k) for k in ("n", "base", "tuned", "delta", "delta_ci95",
                                                                             "p_value")}
            if -100 * o["delta"] >= FORGET_BENCH_POINTS and ci is not None and ci[1] < 0:
                drops.append((label, -100 * o["delta"], [100 * c for c in ci]))
    return drops


def _ci(v: Any) -> list[float] | None:
    return [float(v[0]), float(v[1])] if isinstance(v, list) and len(v) == 2 and all(_is_num(x) for x in v) else None


def _mapping(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def detect_setup(s: RunSeries) -> list[Finding]:
    """Run-setup observations: truncated examples, no validation set."""
    out = []
    start = next((e for e in s.events if e.get("event") == START), {})
    trunc = as_count(start.get("truncated_examples"), positive=True)
    total = next((c for c in (as_count(start.get(k), positive=True)
                              for k in ("train_examples", "examples", "n_train", "num_examples")) if c), None)
    if trunc:
        share = trunc / total if total else None
        ml = int(s.config.get("max_length") or 1024)
        out.append(Finding(
            "truncation", "warning" if share is not None and share >= 0.10 else "info",
            f"{int(trunc)} training example{'s' if trunc != 1 else ''} truncated"
            + (f" ({100 * share:.2g}%)" if share is not None else ""),
            f"Examples longer than max_length ({ml}) lose their end; the model learns cut-off answers.",
            f"Raise max_length (e.g. {min(8192, ml * 2)}) if memory allows.",
            evidence={"truncated_examples": int(trunc), "train_examples": total, "max_length": ml},
            config_patch={"max_length": min(8192, ml * 2)}))
    if not s.validation_splits() and len(s.steps):
        bad = f" ({s.unusable_evals} evaluation records without a usable loss)" if s.unusable_evals else ""
        out.append(Finding(
            "no_validation", "info", f"no validation loss logged{bad}",
            "Without a validation curve, overfitting and plateaus cannot be seen.",
            "Hold out 10% of the data (val_size: 0.1) or name validation sets (val_data).",
            config_patch={} if s.config.get("val_data") else {"val_size": 0.1}))
    return out
