"""torch.distributed glue for `torchrun`: DDP over N processes (NCCL on GPUs, gloo on CPU).
Single-process runs use the same code with world size 1."""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, ContextManager

import torch
import torch.distributed as dist


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> None:
    if world()[2] > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def is_main() -> bool:
    return world()[0] == 0


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if world()[2] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if world()[2] > 1:
        dist.barrier()


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """Wrap for data parallelism: DDP (the frozen model is replicated; only LoRA gradients are reduced)."""
    if world()[2] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def no_sync(model: torch.nn.Module, last: bool) -> ContextManager[Any]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
