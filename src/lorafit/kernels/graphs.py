"""A whole training step (loss, backward, clipping, optimizer) captured once as a CUDA graph, then replayed.

Why: the fused step is a few thousand short kernels; where the host CPU is slow, the GPU waits on Python
(on the H100 machine measured for issue 8, eager steps of Llama-3-8B took about the same ~200 ms at 400
tokens as at 2,048). A replayed graph issues the whole step at once, so it takes its GPU time.

What it needs: the same batch shapes every step (fixed-length rows, or packs made with
`pack_batch(..., pad_to_tokens=, pad_to_segments=)`); a step without host synchronisation
(`causal_lm_loss` on an accelerated model, unpadded or packed batches); and an optimizer built with
`capturable=True`, e.g. `AdamW(params, lr=torch.tensor(lr, device="cuda"), fused=True, capturable=True)`,
whose learning-rate tensor a schedule updates in place (`group["lr"].fill_(new_lr)`).
Warm-up steps run before capture (CUDA libraries allocate lazily) and are undone: parameters and
optimizer state are restored, so the first replayed step is the first training step.

Memory: the copy of the trainable parameters and optimizer state taken before the warm-up is kept in
host memory (`host_snapshot=True`, the default) and dropped before capture, so the warm-up and the
capture peak no higher than an eager step. `host_snapshot=False` keeps the copy on the device, as
earlier versions did (for LoRA r16 on Llama-3-8B: 41.9M float32 parameters, 0.16 GiB more at the peak).
`memory` records the peak allocated bytes after the warm-up and after the capture.

Several GPUs: `grad_hook(params)` runs between backward and clipping, e.g. one all-reduce of the
flattened LoRA gradients. With `eager_tail=True` only the loss and backward are captured; the hook,
clipping and the optimizer step run eagerly after each replay (a handful of launches), so a
collective never has to be captured.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from .accelerate import causal_lm_loss

__all__ = ["CudaGraphStep"]


class CudaGraphStep:
    """`step(batch) -> loss` (a device tensor, overwritten by the next call) replaying one captured step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_batch: Mapping[str, Any], *,
                 loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] = causal_lm_loss,
                 max_grad_norm: float = 1.0, warmup_steps: int = 3, host_snapshot: bool = True,
                 grad_hook: Callable[[list[torch.Tensor]], None] | None = None, eager_tail: bool = False) -> None:
        if not all(g.get("capturable", False) for g in optimizer.param_groups):
            raise ValueError("CudaGraphStep needs an optimizer built with capturable=True")
        self.model, self.optimizer, self.loss_fn, self.max_grad_norm = model, optimizer, loss_fn, max_grad_norm
        self.grad_hook, self.eager_tail = grad_hook, eager_tail
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.static = {k: v.clone() if torch.is_tensor(v) else v for k, v in example_batch.items()}
        saved = self._snapshot("cpu" if host_snapshot else None)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        del saved
        optimizer.zero_grad(set_to_none=True)
        self.memory = {"warmup_peak_bytes": torch.cuda.max_memory_allocated()}
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._forward_backward() if eager_tail else self._body()
        self.memory["capture_peak_bytes"] = torch.cuda.max_memory_allocated()
        self.memory["after_capture_bytes"] = torch.cuda.memory_allocated()

    def _forward_backward(self) -> torch.Tensor:
        loss = self.loss_fn(self.model, self.static)
        loss.backward()
        return loss.detach()

    def _tail(self) -> None:
        """Gradient hook, clipping, optimizer step. Gradients are never reset here: in a captured
        step they are the graph's own buffers, which each replay overwrites."""
        if self.grad_hook is not None:
            self.grad_hook(self.params)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()

    def _body(self) -> torch.Tensor:
        loss = self._forward_backward()
        self._tail()
        return loss

    def _snapshot(self, device: str | None = None) -> tuple[list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
        """Copies of the parameters and optimizer state, on `device` (None: where they are)."""
        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().clone() if device is None else t.detach().to(device, copy=True)

        state = {id(p): {k: copy(v) for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                 for p in self.params if p in self.optimizer.state}
        return [copy(p) for p in self.params], state

    @torch.no_grad()
    def _restore(self, saved: tuple[list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]) -> None:
        values, state = saved
        for p, v in zip(self.params, values):
            p.copy_(v)
            before = state.get(id(p))
            for k, t in self.optimizer.state.get(p, {}).items():
                if not torch.is_tensor(t):
                    continue
                if before and k in before:
                    t.copy_(before[k])
                else:  # state created by the warm-up: a fresh optimizer's state is all zeros
                    t.zero_()

    def __call__(self, batch: Mapping[str, Any]) -> torch.Tensor:
        for k, v in batch.items():
            if k not in self.static:
                raise ValueError(f"batch key {k!r} was not in the captured batch")
            if torch.is_tensor(v):
                if v.shape != self.static[k].shape:
                    raise ValueError(f"{k} has shape {tuple(v.shape)}; the graph was captured for "
                                     f"{tuple(self.static[k].shape)}")
                self.static[k].copy_(v, non_blocking=True)
            elif v != self.static[k]:
                raise ValueError(f"{k}={v!r} differs from the captured {self.static[k]!r}")
        self.graph.replay()
        if self.eager_tail:
            self._tail()
        return self.loss
