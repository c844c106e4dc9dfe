"""What a config resolves to on this machine and world, before training starts: the step plan (total
steps, warmup, global batch under the per-device batch rule) and which micro-batch step runs (fused
kernels, the bucketed CUDA-graph step, or the eager step, and why). Pure functions, returned and logged,
never written back into the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import TrainConfig, fused_kernels_refused
from ..errors import ConfigError


@dataclass
class Plan:
    """What the config resolves to on this world: the rule for several processes is per-device batches
    (HF Trainer's and LLaMA-Factory's): one optimizer step takes `gradient_accumulation_steps` micro-batches
    of `batch_size` examples on each of `world_size` processes."""
    total_steps: int
    warmup_steps: int
    world_size: int
    micro_batches_per_step: int
    global_batch_size: int
    micro_batches_per_epoch: int


def _check_seeded_dropout_size(cfg: TrainConfig, model_config: Any) -> None:
    """The seeded dropout hashes 32-bit element offsets: refuse, before anything is written, micro-batches
    whose widest LoRA input (tokens x intermediate size) would reach 2^31 elements."""
    tokens = max(cfg.pack_tokens or cfg.batch_size * cfg.max_length, cfg.max_length) if cfg.packing \
        else cfg.batch_size * cfg.max_length
    width = max(getattr(model_config, "intermediate_size", 0) or 0, getattr(model_config, "hidden_size", 0) or 0)
    if tokens * width >= 2 ** 31:
        name = "pack_tokens" if cfg.packing else "batch_size"
        raise ConfigError(f"{tokens} tokens per micro-batch x {width} features reach 2^31 elements, more than "
                          "fused_kernels' seeded dropout takes; use smaller micro-batches", field=name)


def make_plan(cfg: TrainConfig, micro_batches_per_epoch: int, world_size: int) -> Plan:
    per_step = cfg.gradient_accumulation_steps * world_size
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.num_epochs * micro_batches_per_epoch) // per_step)
    return Plan(total_steps=total, warmup_steps=cfg.resolve_warmup(total), world_size=world_size,
                micro_batches_per_step=per_step, global_batch_size=cfg.batch_size * per_step,
                micro_batches_per_epoch=micro_batches_per_epoch)


def resolve_fused(setting: bool | str, device: torch.device, strategy: str) -> bool:
    """`fused_kernels: auto` is on where CUDA and Triton run and `true` would be allowed (not under FSDP:
    config.fused_kernels_refused); true/false are kept."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda" or fused_kernels_refused(True, strategy):
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def check_fp8(fused: bool, device: torch.device, strategy: str) -> None:
    """`quantize_base: fp8` where it cannot run is a config error (exit 2), not a silent bf16 run: it needs
    the fused kernels (not FSDP) and FP8 matrix products on the device."""
    if not fused:
        why = ("fused_kernels: auto turns them off on CPU (true turns them on there: slow, for tests)"
               if device.type != "cuda" else "the fused kernels are off")
        if strategy == "fsdp":
            why = "the fused kernels do not run under FSDP"
        raise ConfigError(f"fp8 runs inside lorafit's fused kernels; {why}", field="quantize_base")
    from ..kernels.fp8 import fp8_supported

    why = fp8_supported(device)
    if why:
        raise ConfigError(why, field="quantize_base")


def step_kind(cfg: TrainConfig, fused: bool, device: torch.device, strategy: str, seeded: bool) -> tuple[str, str]:
    """Which micro-batch step the run takes, and why not a faster one (logged once, in the start event):
    'cuda_graph' (bucketed, replayed), 'bucketed' (the same step without capture), 'eager_fused', 'eager'."""
    if not fused:
        return "eager", ""
    if cfg.cuda_graph is False:
        return "eager_fused", "cuda_graph: false"
    on_gpu = device.type == "cuda"
    blockers = [why for cond, why in ((strategy == "fsdp", "FSDP"), (cfg.use_dora, "DoRA"),
                                      (cfg.gradient_checkpointing, "gradient checkpointing"),
                                      (on_gpu and cfg.lora_dropout > 0 and not seeded,
                                       "LoRA dropout without Triton's seeded masks (torch's RNG is not replayed)"))
                if cond]
    if blockers:
        return "eager_fused", "no CUDA graph with " + ", ".join(blockers)
    if on_gpu:
        return "cuda_graph", ""
    if cfg.cuda_graph is True:
        return "bucketed", "no CUDA on this device: the bucketed step runs without capture"
    return "eager_fused", "CUDA graphs need a GPU"


def varlen_ready(model: torch.nn.Module) -> bool:
    """The bucketed step's one-row batches need lorafit's fused attention (varlen, no mask) in every layer."""
    from ..kernels.modules import FusedAttention

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = list(getattr(getattr(causal, "model", None), "layers", []))
    return bool(layers) and all(isinstance(getattr(layer, "self_attn", None), FusedAttention) and
                                getattr(layer.self_attn, "varlen", False) for layer in layers)
