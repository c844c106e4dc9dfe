"""Generation health that got worse with tuning: answers that never end, loop, are empty, leak the
chat template, switch language, or drift far from the references' length (``health`` in
eval/metrics.json; definitions in evaluate/health.py).

A share is a problem of the fine-tune only when it is clearly worse after than before: at least
``RISE`` higher (absolute), at least ``MIN_SHARE`` of the answers and at least ``MIN_ANSWERS`` of them;
the base model's own habits are not the adapter's fault. One finding per problem, over all sets,
with example prompts and answers as evidence.
"""
from __future__ import annotations

import math
from typing import Any

from .findings import Finding

RISE = 0.05
MIN_SHARE = 0.05
MIN_ANSWERS = 2
CRITICAL_SHARE = 0.3      # ... and CRITICAL_RISE higher than before: most answers are unusable
CRITICAL_RISE = 0.2
LENGTH_FACTOR = 2.0       # median answer 2x longer (or shorter) than the references after tuning ...
LENGTH_WORSE = 1.5        # ... and 1.5x further off than the base was

_WHAT = {
    "no_eos": ("answers never end (stopped at max_new_tokens without end-of-sequence, more often than the "
               "references are longer than it)",
               "The tuned model has not learnt to stop: its training answers did not end with the end-of-turn "
               "token the chat template expects, or were cut before their end.",
               "Check that the run's `template` is the model's own (its end-of-turn token closes every training "
               "answer), that max_length is long enough that answers are not truncated (the log's truncation "
               "count), and that the data's answers are complete; raise max_new_tokens only if answers are "
               "legitimately long."),
    "repetition": ("answers loop (a repeated n-gram)",
                   "Loops come with answers that never end and with over-fitted, repetitive training answers.",
                   "Check EOS/template handling first (see no_eos), deduplicate repetitive training answers, and "
                   "train fewer epochs or at a lower learning rate."),
    "empty": ("answers are empty",
              "The tuned model emits end-of-sequence at once: empty answers in the training data, or a template "
              "that puts the end-of-turn token where the answer should start.",
              "Drop examples with empty outputs from the data and check that `template` matches the model."),
    "template_leak": ("answers contain chat-template or special-token text",
                      "The model writes role markers or template tokens as text: the training data was rendered "
                      "with a different template than the model uses, or contains such markers itself.",
                      "Set `template` to the model's own chat template and strip role markers (### Human:, "
                      "<|im_start|>, ...) from the data."),
    "language_mismatch": ("answers come in the other language than the prompt",
                          "The training data's language mix differs from the prompts': the adapter learnt to "
                          "answer in its training language whatever the question.",
                          "Add training examples in the prompts' language (or mix general data in it), or give a "
                          "system_prompt that names the answer language."),
    "length_ratio": ("answers are far longer or shorter than the references",
                     "The tuned model's answer length drifted from the references' (median ratio below).",
                     "Check that training answers have the length wanted, that max_length does not cut them, and "
                     "that max_new_tokens leaves room for a full answer."),
}


def detect_generation_health(metrics: dict[str, Any] | None) -> list[Finding]:
    """Findings for health shares that tuning made worse (none when metrics.json has no health)."""
    sets = (metrics or {}).get("sets") if isinstance(metrics, dict) else None
    if not isinstance(sets, dict):
        return []
    hits: dict[str, list[dict[str, Any]]] = {}
    for name, v in sets.items():
        h = v.get("health") if isinstance(v, dict) else None
        if not (isinstance(h, dict) and isinstance(h.get("before"), dict) and isinstance(h.get("after"), dict)):
            continue
        b, a = h["before"], h["after"]
        n = a.get("n") if isinstance(a.get("n"), (int, float)) else 0   # any other shape: absent
        shown = a.get("examples") if isinstance(a.get("examples"), dict) else {}
        for k in ("no_eos", "repetition", "empty", "template_leak", "language_mismatch"):
            x, y = b.get(k), a.get(k)
            if k == "no_eos" and isinstance(x, (int, float)) and isinstance(a.get("long_references"), (int, float)):
                # Answers as long as the references stop at max_new_tokens whatever the model learnt: only
                # stopping clearly more often than the long references' share says the model does not stop.
                x = max(x, a["long_references"])
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y - x >= RISE and y >= MIN_SHARE \
                    and y * n >= MIN_ANSWERS - 1e-9:
                hits.setdefault(k, []).append({"set": name, "before": b.get(k), "after": y, "n": n,
                                               "examples": _as_list(shown.get(k)),
                                               **({"long_references": a.get("long_references")} if k == "no_eos" else {})})
        lb, la = b.get("length_ratio"), a.get("length_ratio")
        if isinstance(lb, (int, float)) and isinstance(la, (int, float)) and lb > 0 and la > 0:
            off_a, off_b = abs(math.log(la)), abs(math.log(lb))
            if off_a >= math.log(LENGTH_FACTOR) and off_a - off_b >= math.log(LENGTH_WORSE):
                hits.setdefault("length_ratio", []).append({"set": name, "before": lb, "after": la, "n": n,
                                                            "examples": []})
    return [_finding(k, v) for k, v in hits.items()]


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _finding(kind: str, where: list[dict[str, Any]]) -> Finding:
    what, why, fix = _WHAT[kind]
    worst = max(where, key=lambda w: abs(w["after"] - w["before"]))
    if kind == "length_ratio":
        detail = f"median answer/reference length {worst['before']:.2f} → {worst['after']:.2f} on set '{worst['set']}'"
        severe = False
    else:
        detail = f"{100 * worst['after']:.0f}% of answers on set '{worst['set']}' after tuning, {100 * worst['before']:.0f}% before"
        if worst.get("long_references") is not None:
            detail += f"; {100 * worst['long_references']:.0f}% of its references are longer than max_new_tokens"
        severe = worst["after"] >= CRITICAL_SHARE and worst["after"] - worst["before"] >= CRITICAL_RISE
    others = [w["set"] for w in where if w is not worst]
    summary = f"{what}: {detail}" + (f" (also on {', '.join(others)})" if others else "")
    examples = [e for w in where for e in w["examples"]][:3]
    return Finding("generation_health", "critical" if severe else "warning", summary, why, fix,
                   evidence={"problem": kind, "sets": [{k: w[k] for k in ("set", "before", "after", "n")} for w in where],
                             "examples": examples})
