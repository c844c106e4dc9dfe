"""torch.distributed glue for `torchrun`: DDP or FSDP2 over N processes (NCCL on GPUs, gloo on CPU).
Single-process runs use the same code with world size 1.

DDP replicates the whole model on every rank and all-reduces the LoRA gradients. FSDP2
(`torch.distributed.fsdp.fully_shard`) shards every parameter, the frozen base included, over the
ranks as DTensors and all-gathers one decoder layer at a time for its forward and backward: the
answer for a base model that does not fit one GPU. Under FSDP, forward is a collective (every rank
must call it the same number of times) and reading a parameter's full value is one too, so
everything that looks at the weights (checkpoints, the adapter, the finite check) goes through
`checkpoint.trainable_state` / `checkpoint.optimizer_state` on every rank and only then lets rank 0
write.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.distributed as dist

from ..errors import TrainingError

# `auto` picks FSDP when the model's parameters take more than this share of one GPU's memory: the
# rest is needed for activations, LoRA gradients and optimizer state, and the CUDA context.
FSDP_ABOVE = 0.6


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group. torch's own collective timeout is a backstop set past `timeout_s`, so the
    `Watchdog` (which names the phase) fires first."""
    if world()[2] > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s + 60))


class Watchdog:
    """Stops a run whose process waits in one phase longer than `timeout_s`, instead of hanging forever.

    Every unit of work that contains a collective (a micro-batch's forward and backward, an evaluation
    batch, an all-reduce, a checkpoint) runs inside `phase(name)`. A daemon thread checks the clock; when
    a phase has lasted too long it prints one line naming the phase, runs the cleanup callbacks (the run
    folder's lock) and ends the process with status 1, before anything partial is written. Collective
    waits release the GIL (`all_sum` synchronises the stream explicitly for NCCL), so the thread runs.
    With one process nothing can hang on a peer and the watchdog is never armed.
    """

    def __init__(self, timeout_s: float, on_fire: Callable[[], None] | None = None) -> None:
        self.timeout_s = timeout_s
        self.on_fire = on_fire
        self._phase: str | None = None
        self._since = 0.0
        self._armed = world()[2] > 1
        # Rank 0 holds the run folder's lock: when every rank waits in the same phase it fires first and
        # removes the lock, before torchrun tears down the other ranks (a rank it kills cannot clean up).
        self._grace = 0.0 if world()[0] == 0 else min(5.0, 0.25 * timeout_s)
        if self._armed:
            threading.Thread(target=self._watch, name="lorafit-watchdog", daemon=True).start()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        outer, since = self._phase, self._since
        self._phase, self._since = name, time.monotonic()
        try:
            yield
        finally:
            self._phase, self._since = outer, since if outer is None else time.monotonic()

    def _watch(self) -> None:
        tick = min(1.0, max(self.timeout_s / 20, 0.05))
        while True:
            time.sleep(tick)
            phase, since = self._phase, self._since
            if phase is not None and time.monotonic() - since > self.timeout_s + self._grace:
                self.fire(phase)

    def fire(self, phase: str) -> None:
        rank = world()[0]
        print(f"lorafit: error: rank {rank} waited more than {self.timeout_s:g} s in {phase} (dist_timeout): "
              "another process stopped, crashed or took a different branch; no adapter was saved from this "
              "point", file=sys.stderr, flush=True)
        try:
            if self.on_fire is not None:
                self.on_fire()
        finally:
            os._exit(1)


def is_main() -> bool:
    return world()[0] == 0


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if world()[2] == 1:
        return values
    return all_sum_tensor(torch.tensor(values, dtype=torch.float64, device=device))


def all_sum_tensor(t: torch.Tensor) -> list[float]:
    """Sum a small tensor over the ranks and read it (the caller's one host sync)."""
    if world()[2] > 1:
        dist.all_reduce(t)
    if t.is_cuda:  # wait with the GIL released (the watchdog thread must be able to run), then read
        torch.cuda.current_stream(t.device).synchronize()
    return t.tolist()


def all_reduce_sum(t: torch.Tensor) -> None:
    """Sum `t` over the ranks in place, without waiting for it (the reader synchronises)."""
    if world()[2] > 1:
        dist.all_reduce(t)


def sum_gradients(params: list[torch.Tensor], flat: torch.Tensor | None = None) -> None:
    """Sum the gradients over the ranks with one all-reduce of a flat buffer: the mean, because the step
    that calls this (the bucketed / CUDA-graph step, which DDP does not wrap) scales its loss by
    1/denominator on every rank. Called between backward and the optimizer where `BackwardReduce` does
    not run inside backward. `flat`: a buffer the gradients are views of, reduced in place, no copies.
    """
    if world()[2] == 1:
        return
    if flat is not None:
        dist.all_reduce(flat)
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    buf = _flatten_dense_tensors(grads)
    dist.all_reduce(buf)
    torch._foreach_copy_(grads, list(_unflatten_dense_tensors(buf, grads)))


# SMs (CTAs) the all-reduce inside backward may take from backward's own kernels: it overlaps the GEMMs of
# the layers still in backward, and every CTA it holds is an SM those GEMMs lose. On 2 H200s 8 measured
# best of 2, 4, 8, 16 and NCCL's own choice (1.891x and 1.896x against 1.882-1.887x; 2 CTAs 1.864x), a
# margin within the run-to-run spread except against 2 (docs/distributed.md). Megatron gives its overlapped
# gradient reduction a communicator of its own in the same way.
GRADIENT_REDUCE_CTAS = 8
_GRADIENT_GROUP: Any = None


def gradient_group(device: torch.device) -> Any:
    """The process group for the all-reduce inside backward: on NCCL a communicator of its own limited to
    GRADIENT_REDUCE_CTAS CTAs, created (a collective: every rank calls it) and connected by one eager
    all-reduce here, since a communicator must not be set up inside a CUDA-graph capture; elsewhere None
    (the default group)."""
    global _GRADIENT_GROUP
    if world()[2] == 1 or not dist.is_initialized() or dist.get_backend() != "nccl":
        return None
    if _GRADIENT_GROUP is None:
        opts = dist.ProcessGroupNCCL.Options()
        opts.config.max_ctas = GRADIENT_REDUCE_CTAS
        group = dist.new_group(backend="nccl", pg_options=opts)
        dist.all_reduce(torch.zeros(1, device=device), group=group)
        _GRADIENT_GROUP = group
    return _GRADIENT_GROUP


class BackwardReduce:
    """The flat gradient buffer all-reduced in chunks during backward, each chunk as soon as backward has
    accumulated its last gradient: DDP's bucket hooks, for a step DDP does not wrap (a replayed CUDA graph,
    where the collectives are captured with the rest of the step and overlap the layers still in backward).

    Chunks are runs of whole parameters in the buffer's order (~1/16 of it, at least `min_elems`), so the
    first layers' gradients, computed last, leave only a small tail after backward. Chunks are issued in
    descending order only (a chunk that completes early waits for the ones above it): every rank issues
    the same collectives in the same order whatever order its hooks fire in. A sum, like `sum_gradients`:
    the trainer scales the loss by 1/denominator, so the sum over ranks is the mean.
    Only for steps with one micro-batch per rank: the reduction must see the finished gradient.
    """

    def __init__(self, params: list[torch.Tensor], flat: torch.Tensor, min_elems: int = 1 << 20,
                 group: Any = None) -> None:
        self.flat, self.group = flat, group
        target = max(min_elems, flat.numel() // 16)
        self.chunks: list[tuple[int, int, int]] = []  # (start, end, parameters)
        self._chunk_of: dict[int, int] = {}
        start = offset = count = 0
        for p in params:
            self._chunk_of[id(p)] = len(self.chunks)
            offset += p.numel()
            count += 1
            if offset - start >= target or p is params[-1]:
                self.chunks.append((start, offset, count))
                start, count = offset, 0
        self.armed = False
        self._left: list[int] = []
        self._next = -1
        self._works: list[Any] = []
        self._handles = [p.register_post_accumulate_grad_hook(self._accumulated) for p in params]

    def begin(self) -> None:
        """Arm the hooks for the backward that follows."""
        self.armed, self._works = True, []
        self._left = [n for _, _, n in self.chunks]
        self._next = len(self.chunks) - 1

    def _issue_ready(self) -> None:
        while self._next >= 0 and self._left[self._next] == 0:
            lo, hi, _ = self.chunks[self._next]
            self._works.append(dist.all_reduce(self.flat[lo:hi], group=self.group, async_op=True))
            self._next -= 1

    def _accumulated(self, p: torch.Tensor) -> None:
        if self.armed:
            self._left[self._chunk_of[id(p)]] -= 1
            self._issue_ready()

    def finish(self) -> None:
        """After backward: issue what is left (chunks whose parameters got no gradient), in the same order,
        and make the current stream wait for every chunk."""
        for c in range(self._next + 1):
            self._left[c] = 0
        self._issue_ready()
        for w in self._works:
            w.wait()
        self.armed, self._works = False, []

    def idle(self) -> None:
        """A rank with no micro-batch in this step joins the same collectives with its zero gradients."""
        self.begin()
        self.finish()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def broadcast_params(params: list[torch.Tensor]) -> None:
    """Rank 0's values for `params` on every rank (what DDP does when it wraps a model)."""
    if world()[2] == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def barrier() -> None:
    if world()[2] > 1:
        dist.barrier()


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def choose(requested: str, n_bytes: int, device: torch.device) -> str:
    """Resolve `distributed`: 'auto' is DDP unless the parameters exceed FSDP_ABOVE of one GPU's memory.

    On CPU 'auto' is always DDP: there is no device memory to run out of, only host RAM.
    """
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "ddp"
    total = torch.cuda.get_device_properties(device).total_memory
    return "fsdp" if n_bytes > FSDP_ABOVE * total else "ddp"


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """Wrap for data parallelism. DDP: the frozen model is replicated, only LoRA gradients are reduced.
    FSDP: `fully_shard` every decoder layer, then the root (embeddings, final norm, output head).

    FSDP moves each shard to `device`, so the model may arrive on the CPU: a base that does not fit
    one GPU never has to be there whole. Returns the same module object for FSDP (it is changed in
    place) and a DDP wrapper otherwise; with one process, the model unchanged.
    """
    if world()[2] == 1:
        return model
    if strategy == "fsdp":
        return _fully_shard(model, device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # broadcast_buffers=False: the only buffers (rotary frequencies) are computed alike on every rank, and
    # broadcasting them made every forward a collective; bucket views save a gradient copy per step.
    return DDP(model.to(device), device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True)


def _fully_shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world()[2],))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # A transformers model names its repeated block (LlamaDecoderLayer, ...): the unit FSDP gathers.
    blocks = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise TrainingError(f"FSDP: no decoder layer found in {type(base).__name__} (no _no_split_modules)")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_sync(model: torch.nn.Module, last: bool) -> ContextManager[Any]:
    """Skip the gradient reduction on all but the last micro-batch of an accumulation window
    (DDP's `no_sync`; FSDP2's `set_requires_gradient_sync(False)`, which keeps unsharded grads)."""
    if last:
        return nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor; a collective for a DTensor."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like`: this rank's slice when `like` is a DTensor (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or full.shape != like.shape:
        return full.to(like.device)
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def as_float(t: torch.Tensor | float) -> float:
    """A plain float from a gradient norm (clip_grad_norm_ returns a replicated DTensor under FSDP)."""
    return float(full_tensor(t)) if torch.is_tensor(t) else float(t)


def cleanup() -> None:
    global _GRADIENT_GROUP
    _GRADIENT_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()
