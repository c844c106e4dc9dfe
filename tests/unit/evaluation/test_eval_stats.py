"""The paired bootstrap and permutation test of evaluate/stats.py against hand computations."""
from __future__ import annotations

import numpy as np
import pytest

from lorafit.evaluation.metrics import example_stats, mean_stats
from lorafit.evaluation.stats import (RESAMPLES, delta_ci, joint_ci, loss_stats, paired_summary, permutation_p,
                                    percentile_ci)


def test_bootstrap_interval_equals_hand_computation():
    # Four prompts; only the last one improved, by 10 points. A resample's delta is 10k/4 where k, the
    # number of draws of that prompt, is Binomial(4, 1/4): P(k=0)=.316, P(k<=2)=.949, P(k<=3)=.996.
    # So the 2.5th percentile is k=0 (delta 0.0) and the 97.5th is k=3 (delta 7.5), by hand.
    before, after = mean_stats([5.0, 5.0, 5.0, 5.0]), mean_stats([5.0, 5.0, 5.0, 15.0])
    assert delta_ci(before, after) == [0.0, 7.5]
    # Same seed, same interval; another seed still lands on the same hand-computed quantiles.
    assert delta_ci(before, after) == delta_ci(before, after, seed=1) == [0.0, 7.5]
    # A constant shift has no sampling noise: the interval is the point.
    assert delta_ci(mean_stats([1.0, 2.0, 3.0]), mean_stats([3.0, 4.0, 5.0])) == pytest.approx([2.0, 2.0])


def test_permutation_test_is_exact_for_small_sets():
    # Differences 1, 2, 3, 4: of the 2^4 sign patterns only all-plus and all-minus reach |mean| >= 2.5,
    # so the exact two-sided p-value is 2/16.
    before, after = mean_stats([0.0] * 4), mean_stats([1.0, 2.0, 3.0, 4.0])
    assert permutation_p(before, after) == pytest.approx(2 / 16)
    # One prompt changed: every sign pattern gives the same |delta|: p = 1 (no evidence at all).
    assert permutation_p(mean_stats([5.0] * 4), mean_stats([5.0, 5.0, 5.0, 15.0])) == 1.0
    # Larger sets are sampled (Monte Carlo, never exactly 0): 30 prompts all better by about 1.
    rng = np.random.default_rng(0)
    b = rng.normal(0, 1, 30)
    p = permutation_p(mean_stats(b), mean_stats(b + 1 + rng.normal(0, 0.1, 30)))
    assert 0 < p <= 1 / (RESAMPLES + 1) + 1e-12


def test_summary_loss_and_corpus_bleu_use_the_metric_definition():
    # Loss: total NLL / total tokens per resample, not a mean of per-prompt means.
    b, a = loss_stats([10.0, 2.0], [10, 1]), loss_stats([5.0, 2.0], [10, 1])
    assert b.point == pytest.approx(12 / 11) and paired_summary(b, a)["delta"] == pytest.approx(7 / 11 - 12 / 11)
    # Standard-mode BLEU: resampling sums sacrebleu's n-gram counts, so the full sample reproduces corpus BLEU.
    preds = ["the cat sat on the mat", "a dog ran in the park today", "hello there"]
    refs = ["the cat sat on a mat", "the dog ran in the park", "hello there friend"]
    st = example_stats(preds, refs, mode="standard", lang="en")["bleu-4"]
    assert float(st.agg(st.x.sum(0))) == pytest.approx(st.point)
    res = paired_summary(st, example_stats(refs, refs, mode="standard", lang="en")["bleu-4"])
    assert res["delta"] == pytest.approx(100 - st.point) and res["delta_ci95"][0] <= res["delta"] <= res["delta_ci95"][1]


def test_joint_ratio_resamples_prompts_together():
    # The fix's deltas are exactly 0.9x the reference's on every prompt: the ratio is 0.9 on any resample.
    ref_b, ref_a = mean_stats([0.0, 0.0, 0.0]), mean_stats([10.0, 20.0, 30.0])
    fix_b, fix_a = mean_stats([0.0, 0.0, 0.0]), mean_stats([9.0, 18.0, 27.0])
    point, ci = joint_ci([(ref_b, ref_a), (fix_b, fix_a)], lambda r, f: f / r)
    assert point == pytest.approx(0.9) and ci == pytest.approx([0.9, 0.9])
    with pytest.raises(ValueError, match="aligned"):
        joint_ci([(ref_b, ref_a), (mean_stats([0.0]), mean_stats([1.0]))], lambda r, f: f / r)
    assert percentile_ci(np.array([np.nan] * 10)) is None
