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

from .. import rundir as R

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


@dataclass
class _Shape:
    """How the run is set up: length, logging, batch, epochs and the learning-rate schedule."""
    T: int              # optimizer steps
    L: int              # logging_steps
    M: int              # eval_steps
    B: int              # batch_size
    ga: int             # gradient_accumulation_steps
    s_ex: float         # spread of one example's log-loss around the curve
    epochs: int
    lr: float
    warm: int           # warmup steps
    sched: str
    lrs: np.ndarray     # the LR at steps 1..T
    sigma_rec: float    # noise of one logged loss (the mean of B * ga * L examples), in log space

    @property
    def steps(self) -> np.ndarray:
        """The logged steps."""
        return np.arange(self.L, self.T + 1, self.L)


@dataclass
class _Curves:
    """Noise-free curves in log space at every step 1..T; the planted problems bend them."""
    t: np.ndarray               # steps 1..T
    p: np.ndarray               # progress: steps at the reference LR 1e-4
    train: np.ndarray
    val: np.ndarray
    gnorm: np.ndarray
    end: int                    # the last step the run reached (a diverged run may stop early)
    general: np.ndarray | None = None   # a general-domain validation split, when the run has one
    variant: str | None = None          # how a divergence shows: "rise", "rise_nan" or "nan_only"
    nan_steps: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Observed:
    """What the log shows: noisy logged values and the evaluations."""
    x_obs: np.ndarray           # log of each logged loss
    g_obs: np.ndarray           # log of each logged gradient norm
    planted: list[int]          # the steps of the planted loss spikes
    sig_v: float                # noise of one evaluation, in log space
    ev_steps: list[int]
    val_at: dict[int, float]    # the logged validation loss at each evaluation
    true_val: np.ndarray        # the noise-free validation log-loss at each evaluation


def _generate(rng: np.random.Generator, plant: set[str], spike_steps: list[int] | None,
              overfit_onset: int | None) -> SyntheticRun:
    """One draw, in order: shape, curves, the planted problems, the log; _Reject where the truth is ambiguous.
    The order of the random draws is part of the benchmark (seed 0 gives the published numbers)."""
    s = _draw_shape(rng, plant, spike_steps, overfit_onset)
    c = _draw_curves(rng, plant, s)
    if "overfitting" in plant:
        _plant_overfitting(rng, s, c, overfit_onset)
    if "divergence" in plant:
        _plant_divergence(rng, s, c)
    if "warmup_too_short" in plant:
        _plant_warmup_overshoot(rng, s, c)
    if "grad_explosion" in plant:
        _plant_grad_explosion(rng, s, c)
    _draw_general(rng, plant, c)
    o = _observe(rng, plant, s, c, spike_steps)
    _check_truth(plant, s, c, o)
    best_step = o.ev_steps[int(np.argmin(o.true_val))] if "overfitting" in plant else None
    records = _records(rng, plant, s, c, o)
    config = _config(rng, plant, s)
    metrics = _metrics(rng, plant, c)
    params = {"T": s.T, "logging_steps": s.L, "eval_steps": s.M, "batch": s.B, "ga": s.ga, "s_ex": round(s.s_ex, 3),
              "sigma_rec": round(s.sigma_rec, 4), "lr": s.lr, "warmup": s.warm, "variant": c.variant,
              "n_evals": len(o.ev_steps), "true_val": {e: float(np.exp(v)) for e, v in zip(o.ev_steps, o.true_val)},
              **c.extra}
    return SyntheticRun(records, config, metrics, set(plant), o.planted, best_step, params)


def _draw_shape(rng: np.random.Generator, plant: set[str], spike_steps: list[int] | None,
                overfit_onset: int | None) -> _Shape:
    """Length (long enough for the requested spikes or overfitting onset), logging and evaluation
    intervals, batch, epochs, and the LR schedule (tiny under lr_too_low, high with almost no warmup
    under warmup_too_short)."""
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
    n_ex = B * ga * L
    sigma_rec = math.sqrt(math.log(1 + (math.exp(s_ex ** 2) - 1) / n_ex))
    return _Shape(T, L, M, B, ga, s_ex, epochs, lr, warm, sched, _schedule(T, lr, warm, sched), sigma_rec)


def _draw_curves(rng: np.random.Generator, plant: set[str], s: _Shape) -> _Curves:
    """Train loss decaying in progress towards a floor (a small drop at each epoch boundary), validation
    a little above it (flattening early under plateau), the gradient norm growing from LoRA's zero B."""
    p = np.cumsum(s.lrs) / 1e-4
    p_ref = np.cumsum(_schedule(s.T, 1e-4, s.warm, s.sched)) / 1e-4
    c, a = rng.uniform(0.3, 1.5), rng.uniform(0.6, 2.0)
    P = p_ref[-1] if "lr_too_low" in plant else p[-1]   # a too-low LR gets a normal run's time scale
    tau = P * rng.uniform(0.08, 0.4)
    t = np.arange(1, s.T + 1, dtype=float)
    epoch = t / (s.T / s.epochs)
    train = (np.log(c + a * np.exp(-p / tau))
             - rng.uniform(0, 0.08) * np.floor(np.minimum(epoch, s.epochs - 1e-9)))
    tau_v = P * (rng.uniform(0.05, 0.12) if "plateau" in plant else rng.uniform(0.5, 1.5))
    gap0 = rng.uniform(0.03, 0.2)
    val = np.log(c * (1 + gap0) + a * 0.9 * np.exp(-p / tau_v))
    gnorm = np.log(rng.uniform(0.3, 3.0) * (0.3 + 0.7 * (1 - np.exp(-t / max(5.0, 0.03 * s.T)))) * (1 - 0.3 * t / s.T))
    return _Curves(t=t, p=p, train=train, val=val, gnorm=gnorm, end=s.T)


def _plant_overfitting(rng: np.random.Generator, s: _Shape, c: _Curves, onset: int | None) -> None:
    """From the onset on, validation rises while train keeps falling."""
    onset = onset or int(rng.uniform(0.3, 0.7) * s.T)
    c.extra["overfit_onset"] = onset
    ramp = np.clip((c.t - onset) / (s.T - onset), 0, 1)
    c.val = c.val + rng.uniform(0.04, 0.3) * ramp
    c.train = c.train - rng.uniform(0.05, 0.3) * ramp


def _plant_divergence(rng: np.random.Generator, s: _Shape, c: _Curves) -> None:
    """Losses and gradient norm climb (and the run may end in NaN losses), or NaN steps appear alone."""
    T, L = s.T, s.L
    c.variant = _choice(rng, ["rise", "rise_nan", "nan_only"])
    if c.variant == "nan_only":
        c.nan_steps = sorted(int(x) * L for x in rng.choice(np.arange(5, T // L), size=int(rng.integers(1, 3)),
                                                            replace=False))
        return
    t_d = int(rng.uniform(0.2, 0.7) * T)
    dur = max(10 * L, int(rng.uniform(0.05, 0.2) * T))
    ramp = np.clip((c.t - t_d) / dur, 0, 1)
    kappa = math.log(rng.uniform(2.5, 10))
    c.train, c.val = c.train + kappa * ramp, c.val + 0.8 * kappa * ramp
    c.gnorm = c.gnorm + math.log(rng.uniform(1.5, 5)) * ramp
    if c.variant == "rise_nan":
        c.end = min(T // L * L, (t_d + dur) // L * L + int(rng.integers(1, 5)) * L)
        c.nan_steps = [c.end - k * L for k in range(3) if c.end - k * L > t_d]


def _plant_warmup_overshoot(rng: np.random.Generator, s: _Shape, c: _Curves) -> None:
    """The first updates overshoot: after the first logged value the loss climbs back above where it
    started (by `bump`), then training recovers; the gradient norm spikes with it."""
    L = s.L
    w_end = max(2 * s.warm, 0.05 * s.T, 10 * L)
    width = max(float(L), rng.uniform(0.04, 0.1) * w_end)
    t_b = rng.uniform(L + 1.5 * width, max(L + 1.5 * width + 1, 0.6 * w_end))
    bump = max(math.log(rng.uniform(1.3, 2.5)), rng.uniform(5, 8) * s.sigma_rec)
    shape = np.exp(-0.5 * ((c.t - t_b) / width) ** 2)
    c.train = c.train + (bump + c.train[0] - c.train[int(t_b) - 1]) * shape
    c.gnorm = c.gnorm + math.log(rng.uniform(3, 20)) * shape


def _plant_grad_explosion(rng: np.random.Generator, s: _Shape, c: _Curves) -> None:
    """One to three gradient-norm spikes after the first 15% of the run, or a late sustained climb."""
    T, L = s.T, s.L
    if rng.random() < 0.5:
        for step in rng.choice(np.arange(int(0.15 * T), T), size=int(rng.integers(1, 4)), replace=False):
            k = (int(step) // L) * L - 1
            c.gnorm[max(k, 0)] += math.log(rng.uniform(15, 200))
    else:
        c.gnorm = c.gnorm + math.log(rng.uniform(15, 50)) * np.clip((c.t - 0.7 * T) / (0.3 * T), 0, 1)


def _draw_general(rng: np.random.Generator, plant: set[str], c: _Curves) -> None:
    """A general-domain split (always under forgetting, else in half the runs) whose loss drifts with
    progress: up 8-40% under forgetting, within a few percent otherwise."""
    if "forgetting" in plant or rng.random() < 0.5:
        rise = rng.uniform(0.08, 0.4) if "forgetting" in plant else rng.uniform(-0.03, 0.015)
        c.general = math.log(rng.uniform(1.2, 2.5)) + math.log(1 + rise) * c.p / c.p[-1]


def _observe(rng: np.random.Generator, plant: set[str], s: _Shape, c: _Curves,
             spike_steps: list[int] | None) -> _Observed:
    """The logged losses and gradient norms with their noise, the planted loss spikes (fluctuation:
    a jump that decays over a few logs), and the evaluations up to the run's end."""
    L = s.L
    idx = s.steps - 1
    x_obs = _mean_lognormal(rng, c.train[idx], s.s_ex, s.B * s.ga * L)
    g_obs = c.gnorm[idx] + rng.normal(0, rng.uniform(0.05, 0.35), len(idx))
    planted = []
    if "fluctuation" in plant:
        planted = sorted(spike_steps or [int(x) for x in rng.choice(np.arange(int(0.1 * s.T), int(0.9 * s.T)),
                                                                      size=int(rng.integers(1, 4)), replace=False)])
        for step in planted:
            k = int(math.ceil(step / L)) - 1
            r = max(math.log(rng.uniform(1.6, 5)), rng.uniform(8, 14) * s.sigma_rec)
            tau_r = rng.uniform(0.3, 1.5)
            for j in range(6):
                if k + j < len(x_obs):
                    x_obs[k + j] += r * math.exp(-j / tau_r)
            g_obs[k] += math.log(rng.uniform(1.5, 4))
    sig_v = rng.uniform(0.001, 0.006)
    ev_steps = sorted(set(range(s.M, s.T + 1, s.M)) | {s.T} | ({0} if rng.random() < 0.5 else set()))
    ev_steps = [e for e in ev_steps if e <= c.end]
    val_at = {e: float(np.exp(c.val[max(e - 1, 0)] + rng.normal(0, sig_v))) for e in ev_steps}
    true_val = np.array([c.val[max(e - 1, 0)] for e in ev_steps])
    return _Observed(x_obs, g_obs, planted, sig_v, ev_steps, val_at, true_val)


def _rel(a: float, b: float) -> float:
    """The relative change from exp(b) to exp(a)."""
    return math.exp(a - b) - 1


def _check_truth(plant: set[str], s: _Shape, c: _Curves, o: _Observed) -> None:
    """Raise _Reject where the drawn run's ground truth would be ambiguous."""
    end, ev_steps, true_val = c.end, o.ev_steps, o.true_val
    if len(ev_steps) < 3:
        raise _Reject
    if "forgetting" in plant and c.general is not None:
        g_seen = c.general[ev_steps[-1] - 1] - c.general[max(ev_steps[0] - 1, 0)]
        if g_seen < math.log(1.07):
            raise _Reject   # most of the rise happened before the first general evaluation
    v_true = c.val[:end]
    prog = c.p[:end] / c.p[end - 1]   # share of the progress (LR integral) done at each step
    i70, i75 = int(np.searchsorted(prog, 0.7)), int(np.searchsorted(prog, 0.75))
    tail_imp, pre_imp = -_rel(v_true[-1], v_true[i70]), -_rel(v_true[i70], v_true[0])
    if "plateau" in plant and not (tail_imp < 0.004 and pre_imp >= 0.03):
        raise _Reject   # flat over the last 30% of the progress, after a real descent
    if not plant & {"plateau", "overfitting", "divergence", "lr_too_low"} and -_rel(v_true[-1], v_true[i75]) < 0.025:
        raise _Reject   # a "healthy" run still improves 2.5%+ over its last 25%, or it would be a plateau
    if "overfitting" in plant:
        b = int(np.argmin(true_val))
        if _rel(true_val[-1], true_val[b]) < 0.03 or len(ev_steps) - b - 1 < 2:
            raise _Reject
    elif "divergence" not in plant and _rel(true_val[-1], true_val.min()) > 0.005:
        raise _Reject
    drop = -_rel(c.train[end - 1], c.train[0])
    if "lr_too_low" in plant:
        if drop > 0.02 or s.sigma_rec * math.sqrt(2 / max(3, (end // s.L) // 5)) > 0.012:
            raise _Reject   # flatness must be measurable against this log's noise
    elif c.variant in (None, "nan_only") and drop < 0.15:
        raise _Reject


def _records(rng: np.random.Generator, plant: set[str], s: _Shape, c: _Curves, o: _Observed) -> list[dict[str, Any]]:
    """log.jsonl's records: start, train records (1 in 10 in the older format without lr and grad_norm;
    NaN steps with their nonfinite_skip event), evaluations (val, and general when drawn), end."""
    old_format = rng.random() < 0.1 and "grad_explosion" not in plant   # older logs: no lr, no grad_norm
    recs: list[dict[str, Any]] = [{"type": R.TYPE_EVENT, "step": 0, "event": R.START,
                                   "effective_warmup_steps": s.warm, "total_steps": s.T, "truncated_examples": 0}]
    by_step: dict[int, list[dict[str, Any]]] = {}
    for i, step in enumerate(s.steps):
        if step > c.end:
            break
        loss = float(np.exp(o.x_obs[i])) if step not in c.nan_steps else float("nan")
        r_: dict[str, Any] = {"type": R.TYPE_TRAIN, "step": int(step),
                              "epoch": round(float(step / (s.T / s.epochs)), 4), "loss": loss}
        if not old_format:
            r_.update(lr=float(s.lrs[step - 1]), grad_norm=float(np.exp(o.g_obs[i])), tokens_per_s=1000.0)
        by_step.setdefault(int(step), []).append(r_)
        if step in c.nan_steps:
            by_step[int(step)].append({"type": R.TYPE_EVENT, "step": int(step), "event": R.NONFINITE_SKIP})
    for e in o.ev_steps:
        by_step.setdefault(e, []).append(R.eval_record(e, "val", o.val_at[e]))
        if c.general is not None:
            general = float(np.exp(c.general[max(e - 1, 0)] + rng.normal(0, o.sig_v)))
            by_step[e].append(R.eval_record(e, "general", general))
    for step in sorted(by_step):
        recs += by_step[step]
    recs.append({"type": R.TYPE_EVENT, "step": c.end, "event": R.END})
    return recs


def _config(rng: np.random.Generator, plant: set[str], s: _Shape) -> dict[str, Any]:
    """The run's config.yaml, or (1 in 10) none: a partial run folder, where the log alone must do."""
    config = {"batch_size": s.B, "gradient_accumulation_steps": s.ga, "logging_steps": s.L, "eval_steps": s.M,
              "learning_rate": s.lr, "warmup_steps": s.warm if "warmup_too_short" in plant else 0,
              "warmup_ratio": 0.0, "lr_scheduler": s.sched, "num_epochs": s.epochs, "max_grad_norm": 1.0,
              "lora_dropout": 0.1, "weight_decay": 0.0, "max_nonfinite_steps": 3,
              "total_steps": s.T, "effective_warmup_steps": s.warm}
    return {} if rng.random() < 0.1 else config


def _metrics(rng: np.random.Generator, plant: set[str], c: _Curves) -> dict[str, Any] | None:
    """In 3 of 10 runs with a general split, eval's metrics.json for it: loss and ROUGE-L before and
    after (ROUGE-L falls 3-8 points under forgetting)."""
    if c.general is None or not rng.random() < 0.3:
        return None
    rb = rng.uniform(20, 40)
    bad = "forgetting" in plant
    after = rb + (-rng.uniform(3, 8) if bad else rng.uniform(-0.5, 1))
    general = {"lang": "en", "n": 100, "loss_before": float(np.exp(c.general[0])),
               "loss_after": float(np.exp(c.general[c.end - 1])),
               "before": {"rouge-l": rb}, "after": {"rouge-l": after}, "delta": {"rouge-l": after - rb}}
    return {"mode": "llamafactory", "sets": {"general": general}}


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
