"""One micro-batch's loss and one validation pass: the code every caller of lorafit's training step runs
(the trainer, the benchmarks), so a loss is never computed two different ways.

`loss_sum` returns the *summed* token loss and the token count; callers normalise by the whole
optimizer step's supervised tokens, so a step's update does not depend on how its examples were split
into micro-batches or processes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import data as D
from ..data.packing import pack_batch
from . import dist


class FusedLoss(torch.nn.Module):
    """The model with lorafit's fused loss as its forward.

    DDP and FSDP hook the *wrapper's* forward (DDP prepares its gradient reduction there, FSDP gathers
    the root's shards), so the fused loss, which runs the decoder itself, must be that forward: the
    trainer wraps this module, never the bare model, when fused_kernels is on.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fused_batch: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> Any:
        if fused_batch is None:  # plain calls (evaluation) reach the model unchanged
            return self.model(**kwargs)
        from ..kernels import causal_lm_loss

        return causal_lm_loss(self.model, fused_batch, num_items_in_batch=1)


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
             fused: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised tokens (callers normalise), and token count."""
    if fused:  # chunked fused cross-entropy (model is a FusedLoss, maybe wrapped): no full float32 logits
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return model(fused_batch=b), int((b["labels"][:, 1:] != -100).sum())
    # Padded: input_ids + attention_mask. Packed (`pack_batch`): input_ids + position_ids, which restart
    # per example, so transformers builds a block-diagonal mask; the varlen keys are for flash kernels.
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"].to(device)
    logits = model(**inputs, use_cache=False).logits  # no KV cache (with one, HF would not see the packing)
    shift = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), shift.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((shift != -100).sum())


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper. DDP's forward is a collective (it broadcasts buffers and prepares
    the gradient reduction), so anything a rank may run a different number of times, like evaluation on
    uneven shards, must bypass it. FSDP modules are returned as they are: their forward must stay
    collective, and `evaluate_loss` pads the rounds for them."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, enc: D.Encoded, batch_size: int, pad_id: int, device: torch.device,
                  flat: bool = False) -> float:
    """Mean token loss on a validation set, sharded over ranks and summed.

    flat: each batch's examples laid end to end in one row and run through lorafit's fused loss (the
    model must be accelerated), as the bucketed training step runs them: no padding computed, the same
    supervised tokens.

    Any set size works with any number of processes: a rank with no batch only joins the final
    all-reduce (DDP is bypassed, see `unwrap_ddp`); under FSDP every rank runs the same number of
    forwards, dummies included, because each forward gathers the shards.
    """
    model = unwrap_ddp(model)
    was_training = model.training
    model.eval()
    rank, _, ws = dist.world()
    total, count = 0.0, 0
    order = sorted(range(len(enc.input_ids)), key=lambda i: len(enc.input_ids[i]))  # less padding
    starts = list(range(rank * batch_size, len(order), batch_size * ws))
    rounds = len(range(0, len(order), batch_size * ws)) if dist.is_sharded(model) else len(starts)
    for j in range(rounds):
        idx = order[starts[j]:starts[j] + batch_size] if j < len(starts) else order[:batch_size]
        ids, labels = [enc.input_ids[i] for i in idx], [enc.labels[i] for i in idx]
        if flat:
            from ..kernels import causal_lm_loss

            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pack_batch(ids, labels, pad_id=pad_id).items()}
            l, n = causal_lm_loss(model, b, num_items_in_batch=1), int((b["labels"] != -100).sum())
        else:
            l, n = loss_sum(model, D.collate(ids, labels, pad_id), device)
        if j < len(starts):
            total += l.item()
            count += n
    total, count = dist.all_sum([total, float(count)], device)
    model.train(was_training)
    return total / max(count, 1)
