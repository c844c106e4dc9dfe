"""Generation health: does the model stop, stay on topic in the right language, and keep the template
out of its answers? Shares in [0, 1] per set, for base and tuned, so a fine-tune that taught the model
to ramble, loop or leak its chat template shows up even when ROUGE barely moves.

Definitions (per answer; a set's value is the share of its answers, except ``length_ratio``):

- ``no_eos``: generation stopped at ``max_new_tokens`` without the end-of-sequence token (only known
  at generation time: None for a predictions file).
- ``long_references``: the share of prompts whose references' answers (in model tokens, as the
  reference loss counts them) are at least ``max_new_tokens`` long: answers as long as the data's
  cannot end within the budget, so about this share of ``no_eos`` is the budget's doing (a model that
  learnt a domain's long answers writes them to short-reference prompts too). None when unknown (a
  predictions file).
- ``empty``: the answer is empty after stripping whitespace.
- ``repetition``: the answer contains a *loop*: a unit of 1-``MAX_UNIT`` tokens repeated back to back
  at least ``MIN_REPEATS`` times, covering at least ``MIN_LOOP_TOKENS`` tokens ("I can help. I can
  help. I can help." is a loop of a 3-token unit repeated 3 times = 9 tokens: below the threshold;
  four repeats, 12 tokens, is a loop). Tokens are lower-cased words for Latin text and single
  characters for CJK, so Chinese loops count alike. Lists that share a prefix ("1. Open ... 2. Open")
  are not back-to-back repeats and do not count.
- ``template_leak``: chat-template or special-token text in the answer: ``<|...|>`` tokens,
  ``<s>``/``</s>``, ``[INST]``, ``### Human:``/``### Assistant:``/``### Instruction:``/``### Response:``,
  or a line holding only a role name (``user``, ``assistant``, ``system``, ``human``), which is what a
  ChatML turn leaves once its special tokens are decoded away.
- ``language_mismatch``: the prompt's language (``metrics.detect_lang``: Chinese when CJK ideographs
  are at least 5% of its letters) differs from the answer's, for non-empty answers with at least
  ``MIN_LETTERS`` letters.
- ``length_ratio``: median over answers of answer tokens / reference tokens (the mean of a prompt's
  references' lengths); 1.0 means as long as the references. Not a share.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from .metrics import detect_lang

SHARES = ("no_eos", "repetition", "empty", "template_leak", "language_mismatch")
FIELDS = SHARES + ("long_references", "length_ratio")
MAX_UNIT = 16
MIN_REPEATS = 3
MIN_LOOP_TOKENS = 10
MIN_LETTERS = 4
EXAMPLES = 3          # example answers kept per problem (for diagnose's evidence)
EXAMPLE_CHARS = 300

_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_LEAK = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>|\[/?INST\]|###\s*(?:human|assistant|instruction|response)\s*:"
                   r"|^\s*(?:user|assistant|system|human)\s*:?\s*$", re.IGNORECASE | re.MULTILINE)


def tokens(text: str) -> list[str]:
    """Lower-cased words (Latin, digits) and single CJK characters: the unit of loops and lengths."""
    return _TOKEN.findall(text.lower())


def has_loop(text: str) -> bool:
    """True when a unit of 1..MAX_UNIT tokens repeats back to back MIN_REPEATS+ times over MIN_LOOP_TOKENS+ tokens."""
    t = tokens(text)
    n = len(t)
    for unit in range(1, min(MAX_UNIT, n // MIN_REPEATS) + 1):
        run = 0   # tokens so far that equal the token one unit earlier
        for i in range(unit, n):
            run = run + 1 if t[i] == t[i - unit] else 0
            if run >= unit * (MIN_REPEATS - 1) and run + unit >= MIN_LOOP_TOKENS:
                return True
    return False


def has_leak(text: str) -> bool:
    return bool(_LEAK.search(text))


def lang_mismatch(prompt: str, answer: str) -> bool:
    if sum(c.isalpha() for c in answer) < MIN_LETTERS:
        return False
    return detect_lang([prompt]) != detect_lang([answer])


def problems(prompt: str, answer: str, no_eos: bool | None = None) -> dict[str, bool | None]:
    """Each share's verdict for one answer (``no_eos`` None when unknown)."""
    empty = not answer.strip()
    return {"no_eos": no_eos, "repetition": not empty and has_loop(answer), "empty": empty,
            "template_leak": has_leak(answer), "language_mismatch": not empty and lang_mismatch(prompt, answer)}


def health(prompts: Sequence[str], answers: Sequence[str], labels: Sequence[str | Sequence[str]],
           no_eos: Sequence[bool] | None = None, fits: Sequence[bool] | None = None) -> dict[str, Any]:
    """Shares of ``SHARES`` and the ``length_ratio`` for one model's answers to one set.

    ``prompts`` should be the user's text (the prompt's language is read from it); ``no_eos`` per
    answer when generation reported it, else the field is None; ``fits`` per answer: whether its
    references are shorter than max_new_tokens (``long_references``). ``examples`` holds up to ``EXAMPLES``
    (prompt, answer) pairs per problem found.
    """
    n = len(answers)
    flags = [problems(p, a, None if no_eos is None else bool(no_eos[i]))
             for i, (p, a) in enumerate(zip(prompts, answers))]
    out: dict[str, Any] = {"n": n}
    examples: dict[str, list[dict[str, str]]] = {}
    for k in SHARES:
        if k == "no_eos" and no_eos is None:
            out[k] = None
            continue
        hit = [i for i, f in enumerate(flags) if f[k]]
        out[k] = len(hit) / n if n else 0.0
        if hit:
            examples[k] = [{"prompt": _cut(prompts[i]), "answer": _cut(answers[i])} for i in hit[:EXAMPLES]]
    out["long_references"] = sum(not f for f in fits) / n if fits is not None and n else None
    out["length_ratio"] = length_ratio(answers, labels)
    out["examples"] = examples
    return out


def length_ratio(answers: Sequence[str], labels: Sequence[str | Sequence[str]]) -> float | None:
    """Median of answer length / reference length in tokens (None when no reference has a token)."""
    ratios = []
    for a, lab in zip(answers, labels):
        refs = [lab] if isinstance(lab, str) else list(lab)
        ref_len = float(np.mean([len(tokens(r)) for r in refs]))
        if ref_len > 0:
            ratios.append(len(tokens(a)) / ref_len)
    return float(np.median(ratios)) if ratios else None


def _cut(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"
