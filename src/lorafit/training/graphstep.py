"""The trainer's fast micro-batch step: forward and backward at a bucketed length, replayed from a CUDA
graph captured once per bucket.

Why: on short examples (Bitext: ~220 tokens a micro-batch) an eager step of an 8B model is ~30 ms of GPU
work and ~100 ms of Python and kernel launches; a replayed graph issues the whole forward and backward at
once. What a graph needs is fixed shapes and no host synchronisation, so:

- **Buckets.** A micro-batch is right-padded to `bucket(len)`: the next multiple of 128 (at most
  `max_length`), and a graph is captured the first time a (rows, length) shape is seen. Bitext at
  max_length 1024 needs a handful. All graphs share one memory pool (they never run at the same time),
  so the memory they hold is that of the largest bucket's step, not the sum.
- **No attention mask.** Right padding under causal attention: a real token only attends to earlier
  positions, all real, so the mask changes nothing for the tokens that carry labels (pad labels are
  -100), and the maskless fused decoder runs without the mask building and the host synchronisations of
  transformers' padded path.
- **What stays outside the graph** (in the trainer, `Trainer.train_step`): the loss scale (a device
  scalar filled before each replay), the dropout seed (a device counter the trainer sets per micro-batch),
  the gradient all-reduce for several processes, clipping, the one finiteness read per optimizer step and
  the optimizer step itself, guarded by it. Gradients are the graphs' own accumulation buffers: they are
  zeroed in place, never set to None.

`capture=False` runs the same bucketed, maskless step eagerly (CPU, tests): the reference the graph replays.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

BUCKET = 128  # on an H200, 64 measured the same and 32 3% faster with twice the graphs (docs/speed.md)


def bucket_length(n: int, max_length: int, bucket: int = BUCKET) -> int:
    """The padded length a row of `n` tokens is run at."""
    return min(max(bucket, -(-n // bucket) * bucket), max(max_length, n))


def pad_to(batch: dict[str, torch.Tensor], length: int, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids and labels right-padded to `length` (no attention mask: see the module docstring)."""
    ids, labels = batch["input_ids"], batch["labels"]
    rows, n = ids.shape
    out_ids = torch.full((rows, length), pad_id, dtype=ids.dtype)
    out_labels = torch.full((rows, length), -100, dtype=labels.dtype)
    out_ids[:, :n], out_labels[:, :n] = ids, labels
    if "attention_mask" in batch:  # tokens past a row's end are padding however collate marked them
        out_labels[:, :n][batch["attention_mask"] == 0] = -100
    return {"input_ids": out_ids.to(device, non_blocking=True), "labels": out_labels.to(device, non_blocking=True)}


class BucketedStep:
    """`step(batch, scale) -> summed loss` (a device scalar): forward and backward of one micro-batch,
    gradients accumulated into the parameters' `.grad` (scaled by `scale`)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor], *, max_length: int, pad_id: int,
                 device: torch.device, capture: bool, warmup: int = 2,
                 before_forward: Callable[[], Any] | None = None) -> None:
        from ..kernels import causal_lm_loss

        self.model, self.params, self.max_length, self.pad_id, self.device = model, params, max_length, pad_id, device
        self.capture, self.warmup, self.loss_fn = capture, warmup, causal_lm_loss
        self.scale = torch.zeros((), dtype=torch.float32, device=device)
        self.one = torch.ones((), dtype=torch.float32, device=device)  # a summed loss; a device tensor: no copy in capture
        self.graphs: dict[tuple[int, int], tuple[Any, dict[str, torch.Tensor], torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.seed = getattr(_causal(model), "lorafit_dropout_seed", None)
        for p in params:  # the graphs accumulate into these buffers: they must exist before the first capture
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lsum = self.loss_fn(self.model, batch, num_items_in_batch=self.one)
        (lsum * self.scale).backward()
        return lsum.detach()

    def __call__(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        length = bucket_length(int(batch["input_ids"].shape[1]), self.max_length)
        b = pad_to(batch, length, self.pad_id, self.device)
        self.scale.fill_(scale)
        if not self.capture:
            return self._forward_backward(b)
        key = tuple(b["input_ids"].shape)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b)
        graph, static, loss = self.graphs[key]
        for k, v in b.items():
            static[k].copy_(v, non_blocking=True)
        graph.replay()
        return loss

    def _capture(self, b: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
        """Warm up on a side stream (CUDA libraries allocate lazily), undo what the warm-up changed
        (gradients, the dropout counter), then capture."""
        static = {k: v.clone() for k, v in b.items()}
        grads = [p.grad.clone() for p in self.params]
        seed = None if self.seed is None else self.seed.value.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                if seed is not None:
                    self.seed.value.copy_(seed)
                self._forward_backward(static)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            torch._foreach_copy_([p.grad for p in self.params], grads)
            if seed is not None:
                self.seed.value.copy_(seed)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self._forward_backward(static)
        return graph, static, loss

    def memory(self) -> dict[str, Any]:
        """What the captured graphs hold, for the run's start/end events."""
        out: dict[str, Any] = {"graphs": sorted(f"{r}x{n}" for r, n in self.graphs), "captured": self.capture}
        if self.capture:
            out["reserved_gib"] = round(torch.cuda.memory_reserved(self.device) / 2 ** 30, 3)
            out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 3)
        return out


def _causal(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
