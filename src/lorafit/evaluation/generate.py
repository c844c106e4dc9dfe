"""Greedy answers for many prompts: a batched fast path and the plain one-at-a-time reference.

Batching is what makes evaluation affordable (see benchmarks/bench_generate.py): prompts are sorted by
length so a batch wastes little on padding, padded on the *left* so every row's last token is the one
the next token follows, and decoded with the KV cache. Greedy decoding makes both paths deterministic,
so the test suite holds them to identical output.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm


def generate_batched(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 128,
                     batch_size: int = 8, desc: str | None = None, progress: bool = True,
                     no_eos: list[bool] | None = None) -> list[str]:
    """Greedy continuation of each already-rendered prompt, in the order given.

    ``no_eos``: a list to fill, per prompt, with whether generation ran into ``max_new_tokens``
    without emitting the end-of-sequence token (generation health, evaluate/health.py)."""
    encoded = [_encode(tokenizer, p) for p in prompts]
    # Longest first: similar lengths share a batch, and an out-of-memory error shows up at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    stopped: list[bool] = [False] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc or "generate", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = _left_pad([encoded[i] for i in idx], _pad_id(tokenizer))
        flags: list[bool] = []
        texts = _generate(model, tokenizer, batch, max_new_tokens, flags)
        for i, text, cut in zip(idx, texts, flags):
            answers[i], stopped[i] = text, cut
        bar.update(len(idx))
    bar.close()
    if no_eos is not None:
        no_eos[:] = stopped
    return answers


def generate_sequential(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 128,
                        desc: str | None = None, progress: bool = True) -> list[str]:
    """The plain reference: one ``generate`` call per prompt, no padding at all."""
    out = []
    for p in tqdm(prompts, desc=desc or "generate (one at a time)", unit="prompt", disable=not progress):
        ids = torch.tensor([_encode(tokenizer, p)])
        out += _generate(model, tokenizer, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens)
    return out


def _left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad on the left, so every row ends with its own last prompt token and one step serves all rows.
    (Positions come from the attention mask inside ``generate``, so padding shifts nothing.)"""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer: Any, prompt: str) -> list[int]:
    # The chat template already wrote any BOS/special tokens; adding them again would double them
    # (and lorafit.data.encode, which built the training inputs, does not add them either).
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def _generate(model: Any, tokenizer: Any, batch: Any, max_new_tokens: int,
              no_eos: list[bool] | None = None) -> list[str]:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    eos = model.generation_config.eos_token_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         num_beams=1, temperature=None, top_p=None, top_k=None,
                         eos_token_id=tokenizer.eos_token_id if eos is None else eos,
                         pad_token_id=_pad_id(tokenizer))
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    if no_eos is not None:   # a row that finished holds its EOS (then padding); one that ran out has none
        ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id]), device=new_tokens.device)
        ran_out = ~torch.isin(new_tokens, ids).any(dim=1) & (new_tokens.shape[1] >= max_new_tokens)
        no_eos.extend(bool(x) for x in ran_out.tolist())
    return [decoded_text(t) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def decoded_text(text: str) -> str:
    """A generated answer as scored and shown: stripped, and without the U+FFFD that byte-level tokenizers decode
    when max_new_tokens cuts a multi-byte character (a Chinese character is three UTF-8 bytes, often two or
    three tokens) -- a replacement character is no word of the answer."""
    return text.strip().rstrip("\ufffd").rstrip()
