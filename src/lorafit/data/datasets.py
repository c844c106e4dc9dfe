"""The datasets of a run: read, shuffle (from the seed), split, augment and mix in general data.

Everything is read, and so validated, before training starts; the order is a pure function of the seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .formats import Example, read_examples

_PREFIXES = ["", "Question: ", "Please help: ", "请回答：", "Customer: "]


def augment_example(ex: Example, kinds: list[str], rng: random.Random) -> Example:
    """Perturb only the last user turn; the answer (label) is untouched, so it stays valid.

    prompt_variants: a neutral prefix; word_dropout: drop ~10% of words (characters for CJK);
    swap_adjacent: swap one adjacent pair. These mimic typos and paraphrase noise of real users.
    """
    msgs = [dict(m) for m in ex.messages]
    ui = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    text = msgs[ui]["content"]
    for kind in kinds:
        units = text.split(" ") if " " in text else list(text)
        sep = " " if " " in text else ""
        if kind == "word_dropout" and len(units) > 4:
            units = [u for u in units if rng.random() > 0.1] or units
        elif kind == "swap_adjacent" and len(units) > 2:
            i = rng.randrange(len(units) - 1)
            units[i], units[i + 1] = units[i + 1], units[i]
        text = sep.join(units)
        if kind == "prompt_variants":
            text = rng.choice(_PREFIXES[1:]) + text
    msgs[ui]["content"] = text
    return Example(msgs, ex.source, ex.line)


@dataclass
class Datasets:
    train: list[Example]
    val: dict[str, list[Example]]
    n_general: int = 0


def build_datasets(cfg: Any) -> Datasets:
    """Read, shuffle (from the seed), split and mix; everything is validated before training starts."""
    rng = random.Random(cfg.seed)
    train: list[Example] = []
    for path in cfg.data:
        train += read_examples(path, cfg.format, cfg.columns)
    rng.shuffle(train)
    if cfg.max_samples:
        train = train[: cfg.max_samples]
    val: dict[str, list[Example]] = {}
    if cfg.val_size:
        n = int(cfg.val_size) if cfg.val_size >= 1 else max(1, round(cfg.val_size * len(train)))
        if n >= len(train):
            raise DataError(f"val_size {cfg.val_size} leaves no training examples", field="val_size")
        val["val"], train = train[:n], train[n:]
    for name, path in cfg.val_data.items():
        val[name] = read_examples(path, cfg.format, cfg.columns)
    if cfg.general_eval:
        val["general"] = read_examples(cfg.general_eval, "auto")
    if cfg.max_eval_samples:
        val = {k: v[: cfg.max_eval_samples] for k, v in val.items()}
    if cfg.augment:
        aug = [augment_example(ex, cfg.augment, rng) for ex in train for _ in range(cfg.augment_copies)]
        train = train + aug
        rng.shuffle(train)
    n_general = 0
    pool: list[Example] = []
    for path in cfg.general_data:  # read (so checked) even when general_ratio is 0: a listed file is an input
        pool += read_examples(path, "auto")
    if cfg.general_ratio > 0:
        n_general = min(len(pool), round(len(train) * cfg.general_ratio / (1 - cfg.general_ratio)))
        rng.shuffle(pool)
        train = train + pool[:n_general]
        rng.shuffle(train)
    return Datasets(train, val, n_general)
