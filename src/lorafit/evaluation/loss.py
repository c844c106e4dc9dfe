"""Mean token loss of a model on reference answers: the forgetting signal that needs no generation.

Generation metrics are noisy on a general-domain set (many good answers share few n-grams with the
one reference); the likelihood of the reference answers moves smoothly, so a rise from base to tuned
is direct evidence the fine-tune made the model worse at what it could already do.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data import Example, collate, encode


def reference_loss(model: Any, tokenizer: Any, examples: Sequence[Example], *, max_length: int,
                   system_prompt: str | None = None, batch_size: int = 8) -> float | None:
    """Cross-entropy per answer token (summed over all tokens, then divided: long answers weigh more,
    as in training). Prompt tokens never count. None when no example has an answer token left."""
    per = reference_nll(model, tokenizer, examples, max_length=max_length, system_prompt=system_prompt,
                        batch_size=batch_size)
    count = sum(c for _, c in per)
    return sum(t for t, _ in per) / count if count else None


@torch.inference_mode()
def reference_nll(model: Any, tokenizer: Any, examples: Sequence[Example], *, max_length: int,
                  system_prompt: str | None = None, batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL, answer tokens) per example, in the order given; (0.0, 0) for an example whose
    answer was truncated away. Kept per example so evaluate/stats.py can resample prompts."""
    rows = []
    for i, ex in enumerate(examples):
        ids, labels, _ = encode(tokenizer, ex.messages, max_length=max_length, train_on_prompt=False,
                                system_prompt=system_prompt)
        if any(x != -100 for x in labels):
            rows.append((i, ids, labels))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    rows.sort(key=lambda r: len(r[1]))  # similar lengths per batch: less padding, smaller logits
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate([r[1] for r in chunk], [r[2] for r in chunk], pad)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        target = batch["labels"][:, 1:].to(device)
        keep = target != -100  # answer tokens only; upcast just those positions of logits, not the whole batch
        for j, (i, _, _) in enumerate(chunk):
            k = keep[j]
            nll = F.cross_entropy(logits[j, :-1][k].float(), target[j][k], reduction="sum").item()
            out[i] = (nll, int(k.sum()))
    return out
