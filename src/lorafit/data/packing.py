"""Batch layouts: padded (`pad_batch`, named `collate` where the trainer and evaluator use it) and
padding-free (`pack_batch`: examples laid end to end in one row, each with its own positions).

`pack_batch` returns what Hugging Face causal LMs take for packed sequences (the same keys as
transformers' DataCollatorWithFlattening with flash-attention kwargs):
  - position_ids restart at 0 for every example. With no attention_mask, transformers 5.x detects the
    restarts (masking_utils.find_packed_sequence_indices) and builds a block-diagonal causal mask for
    SDPA/eager/flex attention, so a plain HF model computes each example as if alone.
  - cu_seq_lens_q/k and max_length_q/k: the varlen boundaries. HF's flash-attention integrations and
    lorafit's accelerated attention (`lorafit.kernels.varlen_attention`) use them instead of a mask.
  - labels: the example's own labels with the first set to -100, so the last token of one example is
    never trained to predict the first of the next (HF shifts labels by one inside the loss).
The loss is the mean over the same supervised tokens as the padded batch (`pad_batch`, the reference).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["collate", "pack_batch", "pad_batch", "plan_packs"]

IGNORE_INDEX = -100


def pack_batch(list_of_ids: Sequence[Sequence[int]], list_of_labels: Sequence[Sequence[int]], *,
               pad_to_tokens: int | None = None, pad_to_segments: int | None = None,
               pad_id: int = 0) -> dict[str, torch.Tensor | int]:
    """One row holding every example; see the module docstring for the keys.

    For a fixed shape (a CUDA-graph step), `pad_to_tokens` appends one filler example of `pad_id`
    tokens without labels up to that length, and `pad_to_segments` repeats the last boundary so
    cu_seq_lens has pad_to_segments + 1 entries (empty examples); max_length is then pad_to_tokens.
    """
    if not list_of_ids:
        raise ValueError("pack_batch needs at least one example")
    if pad_to_tokens is not None:
        filler = pad_to_tokens - sum(len(x) for x in list_of_ids)
        if filler < 0:
            raise ValueError(f"examples hold {pad_to_tokens - filler} tokens, more than pad_to_tokens={pad_to_tokens}")
        if filler:
            list_of_ids = [*list_of_ids, [pad_id] * filler]
            list_of_labels = [*list_of_labels, [IGNORE_INDEX] * filler]
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    bounds = [0]
    for seq, lab in zip(list_of_ids, list_of_labels, strict=True):
        if len(seq) != len(lab) or not seq:
            raise ValueError(f"example of {len(seq)} ids has {len(lab)} labels (both must be equal and > 0)")
        ids.extend(seq)
        labels.append(IGNORE_INDEX)
        labels.extend(lab[1:])
        positions.extend(range(len(seq)))
        bounds.append(bounds[-1] + len(seq))
    if pad_to_segments is not None:
        if len(bounds) - 1 > pad_to_segments:
            raise ValueError(f"{len(bounds) - 1} examples, more than pad_to_segments={pad_to_segments}")
        bounds += [bounds[-1]] * (pad_to_segments + 1 - len(bounds))
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = pad_to_tokens or int(max(b - a for a, b in zip(bounds[:-1], bounds[1:])))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def pad_batch(list_of_ids: Sequence[Sequence[int]], list_of_labels: Sequence[Sequence[int]],
              pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: the reference a pack must agree with, and the trainer's batch
    when packing is off (as `collate`), so the two can never drift apart."""
    n = max(len(x) for x in list_of_ids)
    ids = torch.full((len(list_of_ids), n), pad_id, dtype=torch.long)
    lab = torch.full((len(list_of_ids), n), IGNORE_INDEX, dtype=torch.long)
    att = torch.zeros((len(list_of_ids), n), dtype=torch.long)
    for r, (i, l) in enumerate(zip(list_of_ids, list_of_labels, strict=True)):
        ids[r, : len(i)] = torch.tensor(i)
        lab[r, : len(l)] = torch.tensor(l)
        att[r, : len(i)] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


collate = pad_batch  # the name the trainer and the loss evaluation call it by


def plan_packs(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group example indices, in order, into packs of at most `max_tokens` tokens (greedy).

    Order is kept so that the data loader's shuffle still decides what trains together; an example
    longer than `max_tokens` gets a pack of its own (truncate before packing to avoid that).
    """
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs
