"""The trainer's fast micro-batch step: forward and backward of a micro-batch laid end to end in one row
(padding-free), at a bucketed length, replayed from a CUDA graph captured once per bucket.

Why: on short examples (Bitext: ~220 tokens a micro-batch) an eager step of an 8B model is ~30 ms of GPU
work and ~100 ms of Python and kernel launches; a replayed graph issues the whole forward and backward at
once. What a graph needs is fixed shapes and no host synchronisation, so:

- **One row, no padding between examples.** A micro-batch's examples (a padded batch's rows, or a pack)
  are laid end to end (`pack_batch`), each with its own positions and varlen boundaries, so attention
  stays within an example (flash varlen) and the step computes the padded batch's loss over the same
  supervised tokens without computing its padding: two Bitext rows of 140 and 80 tokens cost 256
  positions, not 2 x 256. Packed runs (`packing: true`) take the same path.
- **Full rows stay rows.** When a micro-batch's examples are all of one length and fill their bucket
  exactly (every example truncated at `max_length`, or fixed-length chunks), there is nothing to pad:
  they run as the (examples x length) batch they are, with plain causal attention. On an H200 at
  2 x 1024 tokens that is cuDNN's attention, ~6 ms a step faster than flash varlen on the same tokens.
- **Buckets.** The row is filled up to `bucket_length(tokens)` (the next multiple of 128, at most the
  micro-batch's token budget) by one filler example without labels, and the boundary list to a multiple
  of 8 entries by empty examples; a graph is captured the first time a (length, boundaries) shape is seen.
  All graphs share one memory pool (they never run at the same time), so the memory they hold is that of
  the largest bucket's step, not the sum.
- **What stays outside the graph** (in the trainer): the loss scale (a device scalar filled before each
  replay), the dropout seed (a device counter the trainer sets per micro-batch), clipping and the
  optimizer step. The gradient all-reduce for several processes is inside the graph when each process
  runs one micro-batch a step (`dist.BackwardReduce`: chunks issued as backward finishes them, so they
  overlap the rest of backward; captured once, replayed with the step), else after the replays. Graphs
  holding NCCL collectives must be freed before the process group is destroyed (`release`). Gradients
  are the graphs' own accumulation buffers, views of one flat buffer (one all-reduce for several
  processes): zeroed in place, never set to None.

`capture=False` runs the same one-row, bucketed step eagerly (CPU, tests): the reference the graph replays.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data.packing import IGNORE_INDEX, pack_batch
from .optim import flat_grads

BUCKET = 128  # on an H200, 64 measured the same and 32 3% faster with twice the graphs (docs/speed.md)
SEGMENTS = 8  # boundary lists are padded to a multiple of this many examples


def bucket_length(n: int, max_length: int, bucket: int = BUCKET) -> int:
    """The padded length a row of `n` tokens is run at (never past `max_length` unless n is)."""
    return min(max(bucket, -(-n // bucket) * bucket), max(max_length, n))


def segment_slots(n_examples: int) -> int:
    """Entries of the boundary list (examples, the filler and empty slots) for `n_examples` examples."""
    return max(SEGMENTS, -(-(n_examples + 1) // SEGMENTS) * SEGMENTS)


def flat_batch(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], budget: int,
               pad_id: int) -> dict[str, Any]:
    """The micro-batch as the graph runs it: one row of `bucket_length` tokens (see the module docstring),
    or, when its examples are of one length and fill their bucket exactly (full-length rows), those rows
    as they are: nothing to pad, and plain causal attention (cuDNN on Hopper) is faster than varlen flash."""
    total = sum(len(x) for x in ids)
    length = bucket_length(total, budget)
    if length == total and len({len(x) for x in ids}) == 1:
        # Same tokens and targets as the one row (each row's first label is never a target after the shift);
        # positions default to 0..L-1 per row. Row-major, the memory layout is the row's: same dropout masks.
        return {"input_ids": torch.tensor([list(x) for x in ids], dtype=torch.long),
                "labels": torch.tensor([[IGNORE_INDEX, *lab[1:]] for lab in labels], dtype=torch.long)}
    return pack_batch(ids, labels, pad_to_tokens=length, pad_to_segments=segment_slots(len(ids)), pad_id=pad_id)


def graph_key(batch: dict[str, Any]) -> tuple[int, ...]:
    """What a captured graph is specific to: the rows' shape and, for one row, its boundary slots."""
    cu = batch.get("cu_seq_lens_q")
    return (*batch["input_ids"].shape, 0 if cu is None else int(cu.shape[0]))


class BucketedStep:
    """`step((ids, labels), scale) -> summed loss` (a device scalar): forward and backward of one micro-batch
    (its examples' token ids and labels), gradients accumulated into the parameters' `.grad` (scaled by
    `scale`). `budget`: the most tokens a micro-batch holds (batch_size x max_length, or the pack size)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor], *, budget: int, pad_id: int,
                 device: torch.device, capture: bool, warmup: int = 2, seed: Any = None,
                 reduce_in_backward: bool = False) -> None:
        from ..kernels import causal_lm_loss
        from .dist import BackwardReduce, gradient_group

        self.model, self.params, self.budget, self.pad_id, self.device = model, params, budget, pad_id, device
        self.capture, self.warmup, self.loss_fn, self.seed = capture, warmup, causal_lm_loss, seed
        self.scale = torch.zeros((), dtype=torch.float32, device=device)
        self.one = torch.ones((), dtype=torch.float32, device=device)  # a summed loss; a device tensor: no copy in capture
        self.graphs: dict[tuple[int, ...], tuple[Any, dict[str, Any], torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.flat_grad = flat_grads(params)
        # Several processes, one micro-batch each per step: the gradient all-reduce runs inside backward (and
        # inside the captured graph), chunk by chunk; the caller scales the loss so that the sum is the mean.
        self.reducer = BackwardReduce(params, self.flat_grad, group=gradient_group(device)) \
            if reduce_in_backward and self.flat_grad is not None else None
        self._warming = False

    def _forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        reduce = self.reducer is not None and not self._warming
        if reduce:
            self.reducer.begin()
        lsum = self.loss_fn(self.model, batch, num_items_in_batch=self.one)
        (lsum * self.scale).backward()
        if reduce:
            self.reducer.finish()
        return lsum.detach()

    def __call__(self, examples: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]], scale: float) -> torch.Tensor:
        b = flat_batch(*examples, self.budget, self.pad_id)
        b = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
        self.scale.fill_(scale)
        if not self.capture:
            return self._forward_backward(b)
        key = graph_key(b)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b)
        graph, static, loss = self.graphs[key]
        for k, v in b.items():
            if torch.is_tensor(v):
                static[k].copy_(v, non_blocking=True)
        graph.replay()
        return loss

    def _capture(self, b: dict[str, Any]) -> tuple[Any, dict[str, Any], torch.Tensor]:
        """Warm up on a side stream (CUDA libraries allocate lazily), undo what the warm-up changed
        (gradients, the dropout counter), then capture."""
        static = {k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()}
        grads = self.flat_grad.clone() if self.flat_grad is not None else [p.grad.clone() for p in self.params]
        seed = None if self.seed is None else self.seed.value.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        self._warming = True  # no collectives: the other ranks are not warming up this shape
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    if seed is not None:
                        self.seed.value.copy_(seed)
                    self._forward_backward(static)
        finally:
            self._warming = False
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            if self.flat_grad is not None:
                self.flat_grad.copy_(grads)
            else:
                torch._foreach_copy_([p.grad for p in self.params], grads)
            if seed is not None:
                self.seed.value.copy_(seed)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self._forward_backward(static)
        return graph, static, loss

    def release(self) -> None:
        """Free the captured graphs (and unhook the reducer) before the process group goes: a live graph
        holding captured NCCL collectives makes `destroy_process_group` wait forever."""
        if self.capture and self.graphs:
            torch.cuda.synchronize(self.device)
        self.graphs.clear()
        if self.reducer is not None:
            self.reducer.remove()
            self.reducer = None

    def memory(self) -> dict[str, Any]:
        """What the captured graphs hold, for the run's start/end events ("tokens/boundaries" per one-row
        graph, "rows x length" per full-row graph)."""
        names = [f"{n}/{s - 1}" if s else f"{r}x{n}" for r, n, s in sorted(self.graphs)]
        out: dict[str, Any] = {"graphs": names, "captured": self.capture}
        if self.capture:
            out["reserved_gib"] = round(torch.cuda.memory_reserved(self.device) / 2 ** 30, 3)
            out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 3)
        return out
