"""Chat messages -> token ids and a loss mask, built by one function (`encode`) so they never disagree.

Truncation policy (``max_length``): the sequence is split at its first supervised token into a
prompt part and a response part. If too long, the response keeps its *first* tokens (the start of
the answer carries the most signal) with a budget of ``max(max_length // 2, max_length - len(prompt))``,
and the prompt keeps its *last* tokens (the question and assistant header sit next to the answer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .formats import Example

# ChatML: the documented fallback for models that ship no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_template(tokenizer: Any, template: str = "auto") -> Any:
    """ChatML when asked for, or when the tokenizer ships no chat template of its own."""
    if template == "chatml" or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], system_prompt: str | None = None) -> str:
    """The text a model sees before it answers (the assistant header included)."""
    msgs = _with_system(messages, system_prompt)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """The configured system prompt for a conversation without a system turn of its own; one whose system
    turn holds only its tool definitions (`only_tools`, from `formats`) gets the prompt before them."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    if system_prompt and messages[0].get("only_tools"):
        return [{**messages[0], "content": f"{system_prompt}\n\n{messages[0]['content']}"}] + list(messages[1:])
    return list(messages)


def encode(tokenizer: Any, messages: list[dict[str, str]], *, max_length: int, train_on_prompt: bool = False,
           system_prompt: str | None = None) -> tuple[list[int], list[int], bool]:
    """Token ids, labels (-100 where no loss) and whether truncation happened.

    Rendering is cumulative: the text of messages[:k+1] extends that of messages[:k], so each turn's
    tokens are the difference; assistant turns are supervised except their header (and turns whose
    "weight" is 0).
    """
    msgs = _with_system(messages, system_prompt)
    first = next((m["role"] for m in msgs if m["role"] != "system"), None)
    if first != "user":  # else an assistant turn has no prompt to render before it (an empty one raises)
        raise DataError("a conversation must start with a user turn (after an optional system turn)", field="messages")
    ids: list[int] = []
    labels: list[int] = []
    prev = ""

    def add(text: str, supervised: bool) -> None:
        if not text:
            return
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        labels.extend(t if (supervised or train_on_prompt) else [-100] * len(t))

    for k, m in enumerate(msgs):
        if m["role"] == "assistant":
            head = tokenizer.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs[: k + 1], tokenize=False)
            if not (head.startswith(prev) and full.startswith(head)):
                raise DataError("chat template is not prefix-consistent; use template: chatml", field="template")
            add(head[len(prev):], False)
            add(full[len(head):], m.get("weight", 1) != 0)  # weight 0 (OpenAI's format): context, no loss
            prev = full
        else:
            full = tokenizer.apply_chat_template(msgs[: k + 1], tokenize=False)
            if not full.startswith(prev):
                raise DataError("chat template is not prefix-consistent; use template: chatml", field="template")
            add(full[len(prev):], False)
            prev = full
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = _truncate(ids, labels, max_length)
    return ids, labels, truncated


def _truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    s = next((i for i, l in enumerate(labels) if l != -100), len(ids))
    prompt_ids, resp_ids = ids[:s], ids[s:]
    resp_budget = min(len(resp_ids), max(max_length // 2, max_length - len(prompt_ids)))
    prompt_budget = max_length - resp_budget
    p0 = len(prompt_ids) - prompt_budget
    new_ids = prompt_ids[p0:] + resp_ids[:resp_budget]
    new_labels = labels[:s][p0:] + labels[s:][:resp_budget]
    return new_ids, new_labels


@dataclass
class Encoded:
    """A dataset as the trainer reads it: token ids and labels (-100 where no loss), one row an example."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    n_truncated: int


def encode_all(tokenizer: Any, examples: list[Example], cfg: Any) -> Encoded:
    ids, labels, n_trunc = [], [], 0
    for ex in examples:
        try:
            i, l, t = encode(tokenizer, ex.messages, max_length=cfg.max_length, train_on_prompt=cfg.train_on_prompt,
                             system_prompt=cfg.system_prompt)
        except DataError as e:
            if e.field != "messages":
                raise
            raise DataError(e.message, file=ex.source or None, line=ex.line or None, field=e.field) from None
        if all(x == -100 for x in l):
            continue  # nothing to learn from (answer truncated away entirely)
        ids.append(i)
        labels.append(l)
        n_trunc += t
    return Encoded(ids, labels, n_trunc)
