"""How sure is a before/after delta? A paired bootstrap interval and a paired permutation test.

Both are *paired over prompts*: the base and the tuned model answered the same prompts, so each
resample draws prompts (with replacement) and recomputes both models' scores on the same draw. A
prompt with several references (E2E) is one row of ``ExampleStats``, so grouped prompts are what is
resampled. Every resample's score is the metric's own definition applied to the drawn prompts
(a mean for ROUGE and llamafactory BLEU, sacrebleu's corpus formula for standard BLEU, total NLL over
total tokens for the loss), never an approximation of it.

- Interval: percentile bootstrap, ``RESAMPLES`` draws from ``numpy.random.default_rng(SEED)``; the
  2.5th and 97.5th percentiles of the resampled delta are ``delta_ci95``.
- Test: paired permutation (sign-flip) test, two-sided. Under "tuning changed nothing" the two answers
  to a prompt are exchangeable, so each permutation swaps base and tuned on a random half of the
  prompts and recomputes the delta; ``p_value`` is the share of permuted deltas at least as large in
  magnitude as the observed one, counting the observed one (Phipson & Smyth, so never 0). Exact (all
  2^n swaps) when n <= ``EXACT_MAX``. Chosen over Wilcoxon's signed-rank test because it works for
  every metric as defined, corpus BLEU and token-weighted loss included, not only for per-prompt means.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np

from .metrics import ExampleStats

RESAMPLES = 2000
PERMUTATIONS = 2000
SEED = 0
EXACT_MAX = 11   # 2^11 = 2048 sign patterns: enumerate them instead of sampling
_CHUNK = 500     # resamples per matrix product (bounds memory on large sets)


def bootstrap_weights(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) counts: how often each prompt is drawn in each resample (rows sum to n)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float) if n else np.zeros((resamples, 0))


def resampled(st: ExampleStats, weights: np.ndarray) -> np.ndarray:
    """The metric on every resample: its aggregate of the weighted statistic sums."""
    out = [st.agg(weights[i:i + _CHUNK] @ st.x) for i in range(0, len(weights), _CHUNK)]
    return np.concatenate(out) if out else np.zeros(0)


def percentile_ci(samples: np.ndarray) -> list[float] | None:
    """2.5th and 97.5th percentiles of the finite samples (None when fewer than half are finite)."""
    s = samples[np.isfinite(samples)]
    if len(s) < max(1, len(samples) // 2):
        return None
    lo, hi = np.percentile(s, [2.5, 97.5])
    return [float(lo), float(hi)]


def delta_ci(before: ExampleStats, after: ExampleStats, *, resamples: int = RESAMPLES,
             seed: int = SEED) -> list[float] | None:
    """95% paired bootstrap interval of after - before (same prompts drawn for both)."""
    n = _paired_n(before, after)
    if n == 0:
        return None
    w = bootstrap_weights(n, resamples, seed)
    return percentile_ci(resampled(after, w) - resampled(before, w))


def permutation_p(before: ExampleStats, after: ExampleStats, *, permutations: int = PERMUTATIONS,
                  seed: int = SEED) -> float | None:
    """Two-sided paired permutation p-value of after - before (base and tuned swapped per prompt)."""
    n = _paired_n(before, after)
    if n == 0:
        return None
    observed = float(after.agg(after.x.sum(0)) - before.agg(before.x.sum(0)))
    if n <= EXACT_MAX:
        swaps = np.array(list(itertools.product((0.0, 1.0), repeat=n)))
    else:
        swaps = np.random.default_rng(seed).integers(0, 2, size=(permutations, n)).astype(float)
    diff = before.x - after.x   # swapping prompt i moves its statistics from one side to the other
    a_sum, b_sum = after.x.sum(0), before.x.sum(0)
    deltas = []
    for i in range(0, len(swaps), _CHUNK):
        moved = swaps[i:i + _CHUNK] @ diff
        deltas.append(after.agg(a_sum + moved) - before.agg(b_sum - moved))
    d = np.abs(np.concatenate(deltas))
    hits = int(np.sum(d >= abs(observed) - 1e-9 * max(1.0, abs(observed))))
    if n <= EXACT_MAX:
        return hits / len(swaps)   # exact: the identity pattern is among the swaps
    return (hits + 1) / (len(swaps) + 1)


def paired_summary(before: ExampleStats, after: ExampleStats) -> dict[str, float | list[float] | None]:
    """``{"delta", "delta_ci95", "p_value"}`` for one metric of one set."""
    n = _paired_n(before, after)
    delta = float(after.agg(after.x.sum(0)) - before.agg(before.x.sum(0))) if n else 0.0
    return {"delta": delta, "delta_ci95": delta_ci(before, after), "p_value": permutation_p(before, after)}


def joint_ci(pairs: Sequence[tuple[ExampleStats, ExampleStats]],
             combine: Callable[..., np.ndarray], *, resamples: int = RESAMPLES,
             seed: int = SEED) -> tuple[float, list[float] | None]:
    """Point value and 95% interval of ``combine(delta_1, delta_2, ...)``, one delta per (before,
    after) pair, all resampled *jointly* over the same prompts (so the pairs must be aligned row for
    row, e.g. two runs answering the same test set). Used for the write-up's ratios: "gain kept" =
    Δ_fix / Δ_ref, "degradation cut" = 1 - Δloss_fix / Δloss_ref."""
    ns = {_paired_n(b, a) for b, a in pairs}
    if len(ns) != 1:
        raise ValueError(f"joint_ci needs aligned prompts; got set sizes {sorted(ns)}")
    n = ns.pop()
    points = [float(a.agg(a.x.sum(0)) - b.agg(b.x.sum(0))) for b, a in pairs]
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(combine(*[np.asarray(p) for p in points]))
        if n == 0:
            return point, None
        w = bootstrap_weights(n, resamples, seed)
        samples = combine(*[resampled(a, w) - resampled(b, w) for b, a in pairs])
    return point, percentile_ci(np.asarray(samples, dtype=float))


def _paired_n(before: ExampleStats, after: ExampleStats) -> int:
    if before.x.shape[0] != after.x.shape[0]:
        raise ValueError(f"paired statistics need the same prompts: {before.x.shape[0]} vs {after.x.shape[0]}")
    return int(before.x.shape[0])


def loss_stats(nll: Sequence[float], tokens: Sequence[int]) -> ExampleStats:
    """Per-prompt (summed NLL, answer tokens): the set's loss is total NLL / total tokens, as in training."""
    x = np.stack([np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)], axis=1) if len(nll) else np.zeros((0, 2))
    tot = x.sum(0)
    return ExampleStats(x, _ratio_agg, float(tot[0] / tot[1]) if len(x) and tot[1] else float("nan"))


def _ratio_agg(t: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return t[..., 0] / t[..., 1]
