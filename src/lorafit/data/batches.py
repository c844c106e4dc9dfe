"""The training loop's micro-batches: which examples micro-batch k holds, as a pure function of (seed, k).

Why a function of k: a resumed run, or one spread over N processes, must rebuild exactly the micro-batches
an uninterrupted single process would see. Micro-batch k of the run is chunk k % per_epoch of epoch
k // per_epoch's seeded permutation; with packing, the chunks are packs planned once.
"""
from __future__ import annotations

import math
import random
from typing import Any

from .chat import Encoded
from .packing import collate
from .packing import pack_batch, plan_packs

__all__ = ["PackedStream", "Stream", "balanced_groups", "batch_tokens", "deals", "epoch_order"]


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The seeded shuffle of range(size) for one epoch (epoch -1: the order packs are planned from)."""
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class Stream:
    """Padded micro-batches of `batch_size` examples."""

    def __init__(self, enc: Encoded, batch_size: int, seed: int, pad_id: int) -> None:
        self.enc, self.bs, self.seed, self.pad = enc, batch_size, seed, pad_id
        self.n = len(enc.input_ids)
        self.per_epoch = math.ceil(self.n / batch_size)
        self._perm: dict[int, list[int]] = {}
        self._window: tuple[tuple[int, int, int], list[list[int]]] | None = None  # step_groups' current window

    def _order(self, epoch: int, size: int) -> list[int]:
        """epoch_order, kept for the current epoch only."""
        if epoch not in self._perm:
            self._perm = {epoch: epoch_order(size, self.seed, epoch)}
        return self._perm[epoch]

    def indices(self, k: int) -> list[int]:
        epoch, chunk = divmod(k, self.per_epoch)
        return self._order(epoch, self.n)[chunk * self.bs:(chunk + 1) * self.bs]

    def batch(self, k: int) -> dict[str, Any]:
        return self.collate(self.indices(k))

    def step_groups(self, step: int, per_step: int, window_steps: int = 0, total: int | None = None) -> list[list[int]]:
        """Example indices of optimizer step `step`'s `per_step` micro-batches.

        With `window_steps` >= 1 and several micro-batches a step, the examples of the `window_steps` steps of
        `step`'s window (windows cut at `total`) are dealt into as many micro-batches of near-equal tokens, at
        most `batch_size` examples each (`balanced_groups`), shuffled, taken `per_step` at a time: N processes finish
        their share of a step together, and each example is still seen once an epoch's worth of steps. Why a
        window and not one step: four examples split two ways leave one process waiting ~1/20 of a step on
        Bitext; dealing eight steps' examples together halves that (docs/distributed.md). A pure function of
        (seed, step, per_step, window_steps, total): resumes and any number of processes see the same steps."""
        if not deals(self.bs, per_step, window_steps):
            return [self.indices(k) for k in range(step * per_step, (step + 1) * per_step)]
        first = step // window_steps * window_steps
        last = first + window_steps if total is None else max(min(first + window_steps, total), step + 1)
        key = (first, last, per_step)
        if self._window is None or self._window[0] != key:
            flat = [i for k in range(first * per_step, last * per_step) for i in self.indices(k)]
            parts = balanced_groups([len(self.enc.input_ids[i]) for i in flat], (last - first) * per_step, cap=self.bs)
            # In dealt order the window's first step would hold its longest and shortest examples and its last the
            # middling ones, every window: that regularity cost 0.9-1.5% validation loss (docs/distributed.md).
            random.Random(self.seed * 1_000_003 + first).shuffle(parts)
            self._window = (key, [[flat[j] for j in part] for part in parts])
        offset = (step - first) * per_step
        return self._window[1][offset:offset + per_step]

    def examples(self, group: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """(input_ids, labels) of a micro-batch's examples: what the bucketed step lays into one row."""
        return [self.enc.input_ids[i] for i in group], [self.enc.labels[i] for i in group]

    def padded(self, groups: list[list[int]], processes: int = 1) -> list[list[int]]:
        """The same examples re-cut for padded micro-batches: by length, longest first, into as many
        micro-batches of near-equal counts, so each pads to a length close to its examples' (the balanced
        groups pair long with short examples, the worst case for padding). Process r takes parts r, r + N, ...:
        every other block of N parts is reversed (snake order), so no process always gets the longest. A pure
        function of (groups, N), so 1 process with N-fold accumulation and N processes cut a step the same way."""
        order = sorted((i for g in groups for i in g), key=lambda i: -len(self.enc.input_ids[i]))
        n, parts = len(groups), []
        for j in range(n):
            lo, hi = j * len(order) // n, (j + 1) * len(order) // n
            parts.append(order[lo:hi])
        for b in range(processes, n, 2 * processes):
            parts[b:b + processes] = parts[b:b + processes][::-1]
        return parts

    def collate(self, group: list[int]) -> dict[str, Any]:
        return collate([self.enc.input_ids[i] for i in group], [self.enc.labels[i] for i in group], self.pad)

    def supervised(self, group: list[int]) -> int:
        """Supervised tokens of a micro-batch's examples (the loss's denominator counts these)."""
        return sum(sum(1 for l in self.enc.labels[i][1:] if l != -100) for i in group)

    def tokens(self, group: list[int]) -> int:
        """Real tokens of a micro-batch's examples (what `batch_tokens` counts), known without building it."""
        return sum(len(self.enc.input_ids[i]) for i in group)

    def n_supervised(self, k: int) -> int:
        return self.supervised(self.indices(k))


class PackedStream(Stream):
    """`packing: true`: micro-batch k is one pack, examples laid end to end in a single row of at most
    `pack_tokens` tokens (default batch_size x max_length, the token budget of a full padded micro-batch).

    The packs are planned once, from a seeded shuffle (greedy, order kept: `plan_packs`), and each epoch
    shuffles the packs. So every epoch has the same number of steps, which the LR schedule needs up
    front. The loss counts the same supervised tokens as padded batches: each example's first label is
    dropped either way.
    """

    def __init__(self, enc: Encoded, batch_size: int, pack_tokens: int, seed: int, pad_id: int) -> None:
        super().__init__(enc, batch_size, seed, pad_id)
        order = epoch_order(self.n, seed, -1)
        plan = plan_packs([len(enc.input_ids[i]) for i in order], pack_tokens)
        self.packs = [[order[j] for j in pack] for pack in plan]
        self.per_epoch = len(self.packs)

    def indices(self, k: int) -> list[int]:
        epoch, chunk = divmod(k, self.per_epoch)
        return self.packs[self._order(epoch, self.per_epoch)[chunk]]

    def batch(self, k: int) -> dict[str, Any]:
        idx = self.indices(k)
        return pack_batch([self.enc.input_ids[i] for i in idx], [self.enc.labels[i] for i in idx], pad_id=self.pad)


def deals(batch_size: int, per_step: int, window_steps: int, packing: bool = False) -> bool:
    """Whether `Stream.step_groups` re-deals a step's examples: only with several micro-batches a step of at
    least two examples each (one example a micro-batch leaves only whole steps to balance: length grouping)
    and `balance_steps` >= 1; never packs."""
    return not packing and window_steps >= 1 and per_step >= 2 and batch_size >= 2


def balanced_groups(lengths: list[int], n: int, cap: int | None = None) -> list[list[int]]:
    """Indices of `lengths` dealt into n groups of near-equal sums (longest first, each to the lightest group
    with fewer than `cap` members, ties to the lower group); each group keeps its indices in order. Every group
    gets one when len >= n."""
    if cap is not None and len(lengths) > n * cap:
        raise ValueError(f"{len(lengths)} items do not fit {n} groups of at most {cap}")
    loads, groups = [0] * n, [[] for _ in range(n)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        g = min((g for g in range(n) if cap is None or len(groups[g]) < cap), key=lambda g: (loads[g], g))
        loads[g] += lengths[i]
        groups[g].append(i)
    return [sorted(g) for g in groups]


def batch_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens of a padded or packed micro-batch."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
