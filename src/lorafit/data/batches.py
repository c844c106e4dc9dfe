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

__all__ = ["PackedStream", "Stream", "balanced_groups", "batch_tokens", "epoch_order"]


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

    def _order(self, epoch: int, size: int) -> list[int]:
        """epoch_order, kept for the current epoch only."""
        if epoch not in self._perm:
            self._perm = {epoch: epoch_order(size, self.seed, epoch)}
        return self._perm[epoch]

    def indices(self, k: int) -> list[int]:
        epoch, chunk = divmod(k, self.per_epoch)
        return self._order(epoch, self.n)[chunk * self.bs:(chunk + 1) * self.bs]

    def batch(self, k: int) -> dict[str, Any]:
        idx = self.indices(k)
        return collate([self.enc.input_ids[i] for i in idx], [self.enc.labels[i] for i in idx], self.pad)

    def window_examples(self, window: range, budget: int | None = None) -> list[tuple[list[list[int]], list[list[int]]]]:
        """The examples of one optimizer step's micro-batches, in window order. With `budget` (the one-row
        step's token budget), the window's examples are re-dealt into as many micro-batches of near-equal
        tokens (`balanced_groups`), so N processes finish their share at the same time and bucketed rows
        carry less filler. Still a pure function of the window: 1 process with N-fold accumulation runs the
        same micro-batches as N processes. Kept as they are when a balanced one would exceed `budget`."""
        groups = [self.indices(k) for k in window]
        if budget is not None and len(groups) > 1:
            flat = [i for g in groups for i in g]
            dealt = [[flat[j] for j in part] for part in balanced_groups([len(self.enc.input_ids[i]) for i in flat],
                                                                         len(groups))]
            if max(sum(len(self.enc.input_ids[i]) for i in g) for g in dealt) <= budget:
                groups = dealt
        return [([self.enc.input_ids[i] for i in g], [self.enc.labels[i] for i in g]) for g in groups]

    def n_supervised(self, k: int) -> int:
        return sum(sum(1 for l in self.enc.labels[i][1:] if l != -100) for i in self.indices(k))

    def n_tokens(self, k: int) -> int:
        """Real tokens of micro-batch k (what `batch_tokens` counts), known without building it."""
        return sum(len(self.enc.input_ids[i]) for i in self.indices(k))


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


def balanced_groups(lengths: list[int], n: int) -> list[list[int]]:
    """Indices of `lengths` dealt into n groups of near-equal sums (longest first, each to the lightest group,
    ties to the lower group); each group keeps its indices in order. Every group gets one when len >= n."""
    loads, groups = [0] * n, [[] for _ in range(n)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        g = min(range(n), key=lambda g: (loads[g], g))
        loads[g] += lengths[i]
        groups[g].append(i)
    return [sorted(g) for g in groups]


def batch_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens of a padded or packed micro-batch."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
