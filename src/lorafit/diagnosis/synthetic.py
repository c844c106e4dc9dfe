"""Synthetic but realistic training logs with planted problems, for the detector benchmark and tests.

The generative model follows how fine-tuning logs arise, not how the detectors work:
- progress is the integral of the learning rate (warmup ramps it up, the schedule decays it), and the
  loss decays exponentially in progress towards a floor, dropping a little at each epoch boundary
  (the model has seen those examples before);
- each logged loss is the mean of the per-example losses of `batch_size * gradient_accumulation_steps
  * logging_steps` examples, each log-normally spread around the curve (multiplicative noise whose
  size falls with the batch, as real logs do);
- validation loss is the same fixed set each time (small noise), a general-domain split drifts
  with progress, and the gradient norm grows from LoRA's zero-initialised B and then settles.

Planted events are sized against what is observable (a spike must stand out from this log's own
noise) and a sample whose ground truth would be ambiguous (e.g. a "healthy" run whose validation curve
happens to have flattened) is redrawn, so labels are clean on both sides of every threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCORED_KINDS = ("fluctuation", "plateau", "overfitting", "forgetting", "divergence", "lr_too_low",
                "grad_explosion", "warmup_too_short")


@dataclass
class SyntheticRun:
    records: list[dict[str, Any]]
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    truth: set[str]
    spike_steps: list[int] = field(default_factory=list)
    best_step: int | None = None
    params: dict[str, Any] = field(default_factory=dict)


class _Reject(Exception):
    """The drawn sample would have an ambiguous ground truth: draw again."""


def _choice(rng: np.random.Generator, xs: list[Any]) -> Any:
    return xs[int(rng.integers(len(xs)))]


def _schedule(T: int, lr: float, warm: int, kind: str) -> np.ndarray:
    """LR at steps 1..T: linear warmup, then cosine / linear decay to 0, or constant."""
    t = np.arange(1, T + 1, dtype=float)
    out = np.full(T, lr)
    if warm > 0:
        out[t <= warm] = lr * t[t <= warm] / warm
    frac = np.clip((t - warm) / max(1, T - warm), 0, 1)
    after = t > warm
    if kind == "cosine":
        out[after] = lr * 0.5 * (1 + np.cos(math.pi * frac[after]))
    elif kind == "linear":
        out[after] = lr * (1 - frac[after])
    return np.maximum(out, lr * 1e-3)


def _mean_lognormal(rng: np.random.Generator, mu: np.ndarray, s: float, n_ex: int) -> np.ndarray:
    """Log of the mean of n_ex log-normal per-example losses around exp(mu) (mean-preserving)."""
    if n_ex <= 64:
        z = rng.normal(0.0, s, size=(len(mu), n_ex))
        return mu + np.log(np.mean(np.exp(z - s * s / 2), axis=1))
    var = math.log(1 + (math.exp(s * s) - 1) / n_ex)   # Fenton-Wilkinson: mean of n is ~log-normal
    return mu + rng.normal(-var / 2, math.sqrt(var), size=len(mu))


def generate(rng: np.random.Generator, plant: set[str] | frozenset[str] = frozenset(),
             spike_steps: list[int] | None = None, overfit_onset: int | None = None) -> SyntheticRun:
    """One run with the given problems planted; redraws until the ground truth is unambiguous."""
    for _ in range(200):
        try:
            return _generate(rng, set(plant), spike_steps, overfit_onset)
        except _Reject:
            continue
    raise RuntimeError(f"could not draw an unambiguous run for {sorted(plant)}")


def _generate(rng: np.random.Generator, plant: set[str], spike_steps: list[int] | None,
              overfit_onset: int | None) -> SyntheticRun:
    # --- run shape ----------------------------------------------------------------------------
    lo = 300
    if spike_steps:
        lo = max(spike_steps) + 400
    if overfit_onset:
        lo = overfit_onset + 900
    T = int(math.exp(rng.uniform(math.log(lo), math.log(max(lo + 1, 6000)))))
    L = _choice(rng, [x for x in (1, 2, 5, 10, 20, 25) if 30 <= T / x <= 3000])
    need_evals = 8 if plant & {"plateau", "overfitting"} else 3
    M = _choice(rng, [x for x in (10, 20, 25, 50, 100, 200, 250, 500) if need_evals <= T / x <= 60] or [max(10, T // 8)])
    B, ga = _choice(rng, [1, 2, 4, 8]), _choice(rng, [1, 2, 4, 8])
    s_ex = rng.uniform(0.1, 0.6)
    epochs = _choice(rng, [1, 2, 3, 5])
    lr = float(math.exp(rng.uniform(math.log(5e-5), math.log(3e-4))))
    if "lr_too_low" in plant:
        lr = float(math.exp(rng.uniform(math.log(1e-7), math.log(2e-6))))
    if "warmup_too_short" in plant:
        lr = float(rng.uniform(3e-4, 1e-3))
        warm = _choice(rng, [0, 1, 2, 5])
    else:
        warm = max(_choice(rng, [0, 10, 20, 50]), math.ceil(_choice(rng, [0.03, 0.05, 0.1]) * T))
    sched = _choice(rng, ["cosine", "cosine", "linear", "constant"])
    lrs = _schedule(T, lr, warm, sched)
    steps = np.arange(L, T + 1, L)
    n_ex = B * ga * L
    sigma_rec = math.sqrt(math.log(1 + (math.exp(s_ex ** 2) - 1) / n_ex))

    # --- noise-free curves in log space, at every step ----------------------------------------
    p = np.cumsum(lrs) / 1e-4                           # progress: steps at the reference LR 1e-4
    p_ref = np.cumsum(_schedule(T, 1e-4, warm, sched)) / 1e-4
    c, a = rng.uniform(0.3, 1.5), rng.uniform(0.6, 2.0)
    P = p_ref[-1] if "lr_too_low" in plant else p[-1]   # a too-low LR gets a normal run's time scale
    tau = P * rng.uniform(0.08, 0.4)
    t = np.arange(1, T + 1, dtype=float)
    epoch = t / (T / epochs)
    train = np.log(c + a * np.exp(-p / tau)) - rng.uniform(0, 0.08) * np.floor(np.minimum(epoch, epochs - 1e-9))
    tau_v = P * (rng.uniform(0.05, 0.12) if "plateau" in plant else rng.uniform(0.5, 1.5))
    if "plateau" in plant:
        tau = min(tau, tau_v)
    gap0 = rng.uniform(0.03, 0.2)
    val = np.log(c * (1 + gap0) + a * 0.9 * np.exp(-p / tau_v))
    gnorm = np.log(rng.uniform(0.3, 3.0) * (0.3 + 0.7 * (1 - np.exp(-t / max(5.0, 0.03 * T)))) * (1 - 0.3 * t / T))
    truth = set(plant)
    best_step = None
    extra: dict[str, Any] = {}

    if "overfitting" in plant:
        onset = overfit_onset or int(rng.uniform(0.3, 0.7) * T)
        extra["overfit_onset"] = onset
        ramp = np.clip((t - onset) / (T - onset), 0, 1)
        val = val + rng.uniform(0.04, 0.3) * ramp
        train = train - rng.uniform(0.05, 0.3) * ramp
    if "divergence" in plant:
        variant = _choice(rng, ["rise", "rise_nan", "nan_only"])
    else:
        variant = None
    nan_steps: list[int] = []
    end = T
    if variant in ("rise", "rise_nan"):
        t_d = int(rng.uniform(0.2, 0.7) * T)
        dur = max(10 * L, int(rng.uniform(0.05, 0.2) * T))
        ramp = np.clip((t - t_d) / dur, 0, 1)
        kappa = math.log(rng.uniform(2.5, 10))
        train, val = train + kappa * ramp, val + 0.8 * kappa * ramp
        gnorm = gnorm + math.log(rng.uniform(1.5, 5)) * ramp
        if variant == "rise_nan":
            end = min(T // L * L, (t_d + dur) // L * L + int(rng.integers(1, 5)) * L)
            nan_steps = [end - k * L for k in range(3) if end - k * L > t_d]
    elif variant == "nan_only":
        nan_steps = sorted(int(x) * L for x in rng.choice(np.arange(5, T // L), size=int(rng.integers(1, 3)), replace=False))
    if "warmup_too_short" in plant:
        # The first updates overshoot: after the first logged value the loss climbs back above where
        # it started (by `bump`), then training recovers.
        w_end = max(2 * warm, 0.05 * T, 10 * L)
        width = max(float(L), rng.uniform(0.04, 0.1) * w_end)
        t_b = rng.uniform(L + 1.5 * width, max(L + 1.5 * width + 1, 0.6 * w_end))
        bump = max(math.log(rng.uniform(1.3, 2.5)), rng.uniform(5, 8) * sigma_rec)
        shape = np.exp(-0.5 * ((t - t_b) / width) ** 2)
        train = train + (bump + train[0] - train[int(t_b) - 1]) * shape
        gnorm = gnorm + math.log(rng.uniform(3, 20)) * shape
    if "grad_explosion" in plant:
        if rng.random() < 0.5:
            for s in rng.choice(np.arange(int(0.15 * T), T), size=int(rng.integers(1, 4)), replace=False):
                k = (int(s) // L) * L - 1
                gnorm[max(k, 0)] += math.log(rng.uniform(15, 200))
        else:
            gnorm = gnorm + math.log(rng.uniform(15, 50)) * np.clip((t - 0.7 * T) / (0.3 * T), 0, 1)
    general = None
    if "forgetting" in plant or rng.random() < 0.5:
        rise = rng.uniform(0.08, 0.4) if "forgetting" in plant else rng.uniform(-0.03, 0.015)
        general = math.log(rng.uniform(1.2, 2.5)) + math.log(1 + rise) * p / p[-1]

    # --- observe: logged records --------------------------------------------------------------
    idx = steps - 1
    x_obs = _mean_lognormal(rng, train[idx], s_ex, n_ex)
    g_obs = gnorm[idx] + rng.normal(0, rng.uniform(0.05, 0.35), len(idx))
    planted = []
    if "fluctuation" in plant:
        planted = sorted(spike_steps or [int(s) for s in rng.choice(np.arange(int(0.1 * T), int(0.9 * T)),
                                                                      size=int(rng.integers(1, 4)), replace=False)])
        for s in planted:
            k = int(math.ceil(s / L)) - 1
            r = max(math.log(rng.uniform(1.6, 5)), rng.uniform(8, 14) * sigma_rec)
            tau_r = rng.uniform(0.3, 1.5)
            for j in range(6):
                if k + j < len(x_obs):
                    x_obs[k + j] += r * math.exp(-j / tau_r)
            g_obs[k] += math.log(rng.uniform(1.5, 4))
    sig_v = rng.uniform(0.001, 0.006)
    ev_steps = sorted(set(range(M, T + 1, M)) | {T} | ({0} if rng.random() < 0.5 else set()))
    ev_steps = [e for e in ev_steps if e <= end]
    val_at = {e: float(np.exp(val[max(e - 1, 0)] + rng.normal(0, sig_v))) for e in ev_steps}
    true_val = np.array([val[max(e - 1, 0)] for e in ev_steps])
    true_val_at = {e: float(np.exp(v)) for e, v in zip(ev_steps, true_val)}

    # --- ground truth checks: redraw anything ambiguous ----------------------------------------
    def rel(a_: float, b_: float) -> float:
        return math.exp(a_ - b_) - 1

    if len(ev_steps) < 3:
        raise _Reject
    if "forgetting" in plant and general is not None:
        g_seen = general[ev_steps[-1] - 1] - general[max(ev_steps[0] - 1, 0)]
        if g_seen < math.log(1.07):
            raise _Reject   # most of the rise happened before the first general evaluation
    v_true = val[:end]
    prog = p[:end] / p[end - 1]   # share of the progress (LR integral) done at each step
    i70, i75 = int(np.searchsorted(prog, 0.7)), int(np.searchsorted(prog, 0.75))
    tail_imp, pre_imp = -rel(v_true[-1], v_true[i70]), -rel(v_true[i70], v_true[0])
    if "plateau" in plant and not (tail_imp < 0.004 and pre_imp >= 0.03):
        raise _Reject   # flat over the last 30% of the progress, after a real descent
    if not plant & {"plateau", "overfitting", "divergence", "lr_too_low"} and -rel(v_true[-1], v_true[i75]) < 0.025:
        raise _Reject   # a "healthy" run still improves 2.5%+ over its last 25%, or it would be a plateau
    if "overfitting" in plant:
        b = int(np.argmin(true_val))
        best_step = ev_steps[b]
        if rel(true_val[-1], true_val[b]) < 0.03 or len(ev_steps) - b - 1 < 2:
            raise _Reject
    elif "divergence" not in plant and rel(true_val[-1], true_val.min()) > 0.005:
        raise _Reject
    drop = -rel(train[end - 1], train[0])
    if "lr_too_low" in plant:
        if drop > 0.02 or sigma_rec * math.sqrt(2 / max(3, (end // L) // 5)) > 0.012:
            raise _Reject   # flatness must be measurable against this log's noise
    elif variant in (None, "nan_only") and drop < 0.15:
        raise _Reject

    # --- records --------------------------------------------------------------------------------
    old_format = rng.random() < 0.1 and "grad_explosion" not in plant   # older logs: no lr, no grad_norm
    recs: list[dict[str, Any]] = [{"type": "event", "step": 0, "event": "start", "effective_warmup_steps": warm,
                                   "total_steps": T, "truncated_examples": 0}]
    by_step: dict[int, list[dict[str, Any]]] = {}
    for i, s in enumerate(steps):
        if s > end:
            break
        loss = float(np.exp(x_obs[i])) if s not in nan_steps else float("nan")
        r_: dict[str, Any] = {"type": "train", "step": int(s), "epoch": round(float(s / (T / epochs)), 4), "loss": loss}
        if not old_format:
            r_.update(lr=float(lrs[s - 1]), grad_norm=float(np.exp(g_obs[i])), tokens_per_s=1000.0)
        by_step.setdefault(int(s), []).append(r_)
        if s in nan_steps:
            by_step[int(s)].append({"type": "event", "step": int(s), "event": "nonfinite_skip"})
    for e in ev_steps:
        by_step.setdefault(e, []).append({"type": "eval", "step": e, "split": "val", "eval_loss": val_at[e]})
        if general is not None:
            by_step[e].append({"type": "eval", "step": e, "split": "general",
                               "eval_loss": float(np.exp(general[max(e - 1, 0)] + rng.normal(0, sig_v)))})
    for s in sorted(by_step):
        recs += by_step[s]
    recs.append({"type": "event", "step": end, "event": "end"})
    config = {"batch_size": B, "gradient_accumulation_steps": ga, "logging_steps": L, "eval_steps": M,
              "learning_rate": lr, "warmup_steps": warm if "warmup_too_short" in plant else 0,
              "warmup_ratio": 0.0, "lr_scheduler": sched, "num_epochs": epochs, "max_grad_norm": 1.0,
              "lora_dropout": 0.1, "weight_decay": 0.0, "max_nonfinite_steps": 3,
              "total_steps": T, "effective_warmup_steps": warm}
    if rng.random() < 0.1:
        config = {}   # a partial run folder: the log alone must do
    metrics = None
    if general is not None and rng.random() < 0.3:
        rb = rng.uniform(20, 40)
        bad = "forgetting" in plant
        lb = float(np.exp(general[0]))
        metrics = {"mode": "llamafactory", "sets": {"general": {
            "lang": "en", "n": 100, "loss_before": lb, "loss_after": float(np.exp(general[end - 1])),
            "before": {"rouge-l": rb}, "after": {"rouge-l": rb + (-rng.uniform(3, 8) if bad else rng.uniform(-0.5, 1))},
            "delta": {}}}}
        g = metrics["sets"]["general"]
        g["delta"]["rouge-l"] = g["after"]["rouge-l"] - rb
    params = {"T": T, "logging_steps": L, "eval_steps": M, "batch": B, "ga": ga, "s_ex": round(s_ex, 3),
              "sigma_rec": round(sigma_rec, 4), "lr": lr, "warmup": warm, "variant": variant, "n_evals": len(ev_steps),
              "true_val": true_val_at, **extra}
    return SyntheticRun(recs, config, metrics, truth, planted, best_step, params)


def benchmark_suite(seed: int = 0, per_kind: int = 25, healthy: int = 60) -> list[SyntheticRun]:
    """The benchmark's logs: `per_kind` per problem kind (some with two problems), `healthy` clean ones,
    plus the requested fixed cases (spikes at steps 200, 400, 1400, 2000; overfitting from 3200-3400)."""
    rng = np.random.default_rng(seed)
    runs: list[SyntheticRun] = []
    for kind in SCORED_KINDS:
        for i in range(per_kind):
            plant = {kind}
            if kind == "fluctuation" and i < 10:
                runs.append(generate(rng, plant, spike_steps=[200, 400, 1400, 2000]))
                continue
            if kind == "overfitting" and i < 10:
                runs.append(generate(rng, plant, overfit_onset=int(rng.integers(3200, 3401))))
                continue
            if i % 5 == 4 and kind in ("fluctuation", "overfitting", "forgetting", "grad_explosion"):
                other = {"fluctuation": "forgetting", "overfitting": "fluctuation",
                         "forgetting": "overfitting", "grad_explosion": "forgetting"}[kind]
                plant = {kind, other}
            runs.append(generate(rng, plant))
    runs += [generate(rng, set()) for _ in range(healthy)]
    return runs
