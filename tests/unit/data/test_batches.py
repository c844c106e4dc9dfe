"""Which examples each optimizer step's micro-batches hold (data.batches): the dealing over several steps."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from lorafit.data import Encoded
from lorafit.data.batches import Stream, balanced_groups


def _stream(lengths: list[int], bs: int = 2, seed: int = 0) -> Stream:
    enc = Encoded(input_ids=[[7] * n for n in lengths], labels=[[-100] + [7] * (n - 1) for n in lengths], n_truncated=0)
    return Stream(enc, bs, seed=seed, pad_id=0)


def test_balanced_groups_respects_the_cap():
    assert balanced_groups([5, 3, 8, 1, 2], 2) == [[2, 4], [0, 1, 3]]
    assert balanced_groups([100, 1, 1, 1], 2, cap=2) == [[0, 3], [1, 2]]  # not 100 alone against three
    with pytest.raises(ValueError):
        balanced_groups([1] * 5, 2, cap=2)


@pytest.mark.parametrize("per_step,window,bs", [(2, 8, 2), (3, 4, 2), (4, 3, 3), (2, 1, 3)])
def test_each_step_keeps_its_share_and_the_window_deals_near_equal_tokens(per_step, window, bs):
    lengths = [random.Random(i).randint(20, 600) for i in range(97)]  # an odd size: the epoch ends mid micro-batch
    stream = _stream(lengths, bs)
    total = 3 * stream.per_epoch // per_step  # windows cut by the run's end and crossing epochs
    plain = [[stream.indices(k) for k in range(s * per_step, (s + 1) * per_step)] for s in range(total)]
    dealt = [stream.step_groups(s, per_step, window, total) for s in range(total)]
    for first in range(0, total, window):
        steps = range(first, min(first + window, total))
        # the window's examples, each as often as the shuffle has it there (an epoch's end may repeat one)
        assert Counter(i for s in steps for g in dealt[s] for i in g) == Counter(i for s in steps for g in plain[s] for i in g)
        loads = [stream.tokens(g) for s in steps for g in dealt[s]]
        assert max(loads) - min(loads) <= max(lengths)
    assert all(len(dealt[s]) == per_step and all(1 <= len(g) <= bs for g in dealt[s]) for s in range(total))
    # balanced: the slowest micro-batch of a step (what N processes wait for) is lighter than the shuffle's
    slowest = lambda steps: sum(max(stream.tokens(g) for g in gs) for gs in steps)  # noqa: E731
    assert slowest(dealt) < slowest(plain)
    # a pure function of the step: a fresh stream (a resumed run, another process) deals the same, in any order
    again = _stream(lengths, bs)
    assert [again.step_groups(s, per_step, window, total) for s in reversed(range(total))] == dealt[::-1]


def test_no_dealing_with_one_micro_batch_a_step_one_example_a_micro_batch_or_when_off():
    stream = _stream([30, 300, 40, 200, 50, 60, 70, 80], 2)
    assert [stream.step_groups(s, 1, 8, 4) for s in range(4)] == [[stream.indices(s)] for s in range(4)]
    assert stream.step_groups(1, 2, 0, 2) == [stream.indices(2), stream.indices(3)]
    single = _stream([30, 300, 40, 200, 50, 60, 70, 80], 1)  # only whole steps could be balanced: length grouping
    assert [single.step_groups(s, 2, 8) for s in range(4)] == [[single.indices(2 * s), single.indices(2 * s + 1)]
                                                               for s in range(4)]


def test_padded_recut_keeps_the_examples_and_pads_less():
    stream = _stream([500, 20, 480, 30, 25, 510, 15, 490], 2)
    groups = stream.step_groups(0, 4, 1, 1)
    recut = stream.padded(groups)
    assert sorted(i for g in recut for i in g) == sorted(i for g in groups for i in g) and len(recut) == 4
    assert all(1 <= len(g) <= 2 for g in recut)
    padded = lambda gs: sum(len(g) * max(len(stream.enc.input_ids[i]) for i in g) for g in gs)  # noqa: E731
    assert padded(recut) < padded(groups)
    assert stream.padded(groups) == recut


def test_the_dealt_micro_batches_are_shuffled_over_the_window():
    """Dealt in order, a window's first step would always hold its longest example (and its last the middling
    ones): a regularity every window repeats, which cost validation loss on a GPU (docs/distributed.md)."""
    lengths = [random.Random(i).randint(20, 600) for i in range(400)]
    stream = _stream(lengths, 2)
    where = []
    for first in range(0, 96, 8):
        steps = [stream.step_groups(s, 2, 8) for s in range(first, first + 8)]
        longest = max((i for gs in steps for g in gs for i in g), key=lambda i: lengths[i])
        where.append(next(j for j, gs in enumerate(steps) if any(longest in g for g in gs)))
    assert len(set(where)) > 3, where


def test_padded_recut_deals_the_processes_in_snake_order():
    stream = _stream([10 * (i + 1) for i in range(16)], 2)
    groups = stream.step_groups(0, 8, 1)
    parts = stream.padded(groups, 2)
    tokens = [stream.tokens(p) for p in parts]
    rank0, rank1 = sum(tokens[0::2]), sum(tokens[1::2])
    assert abs(rank0 - rank1) <= max(tokens) - min(tokens) and tokens[0] > tokens[1] and tokens[2] < tokens[3]
    assert sorted(i for p in parts for i in p) == list(range(16))
    assert [sorted(p) for p in stream.padded(groups, 1)] != [sorted(p) for p in parts]
