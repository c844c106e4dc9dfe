"""``lorafit eval RUN``: base vs base+adapter on every validation set of a run, written to RUN/eval/.

A readable sequence over the package's parts: read the run's config and sets; load the base once and
wrap it with the adapter; pass 1, adapter disabled (PEFT's ``disable_adapter()``): the base model's
answers and reference loss on every set; pass 2, adapter merged: the tuned model's; then score both
and write predictions, metrics.json and metrics.md. One object serves both rows, so they share
weights, tokenizer and prompts exactly.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import load_config
from ..data import Example, build_datasets, ensure_template, group_references, render_prompt
from ..errors import ConfigError, RunError
from ..model import load_adapter, load_model, load_tokenizer
from .generate import generate_batched
from .loss import reference_loss
from .metrics import KEYS, MODES, detect_lang, score_predictions
from .predictions import write_predictions
from .table import metrics_table_md


def evaluate_run(run_dir: str | Path, *, max_new_tokens: int | None = None, batch_size: int | None = None,
                 max_samples: int | None = None, mode: str | None = None, sets: Sequence[str] | None = None,
                 device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Evaluate a run folder; writes RUN/eval/* and returns the metrics.json dict.

    None arguments take the run's config (``max_new_tokens``, ``eval_batch_size``, ``metric_mode``);
    ``max_samples`` caps prompts per set (after grouping references); ``sets`` picks sets by name.
    """
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise RunError("not a run folder (no config.yaml)", file=str(run))
    cfg = load_config(cfg_path)
    mode = mode or cfg.metric_mode
    if mode not in MODES:
        raise ConfigError(f"unknown metric mode {mode!r}; expected one of {MODES}", field="mode")
    max_new_tokens = max_new_tokens or cfg.max_new_tokens
    batch_size = batch_size or cfg.eval_batch_size
    eval_sets = _eval_sets(cfg, cfg_path, sets, max_samples)

    tok = ensure_template(load_tokenizer(cfg.model), cfg.template)
    model = load_adapter(load_model(cfg.model, device=device, dtype=cfg.dtype), run / "adapter")
    model.eval()  # no LoRA dropout while measuring
    todo = [_EvalSet.of(name, exs, tok, cfg.system_prompt) for name, exs in eval_sets.items()]
    out_dir = run / "eval"
    measure = dict(tok=tok, out_dir=out_dir, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   max_length=cfg.max_length, system_prompt=cfg.system_prompt, progress=progress)

    with model.disable_adapter():  # the LoRA path is skipped: these are the base model's numbers
        before = {s.name: _measure(model, s, "base", **measure) for s in todo}
    # Tuned = adapter merged into the weights: the model `lorafit merge` ships, and one matmul per
    # layer instead of three. Merging in place is safe: the base pass is done and nothing is saved.
    model.merge_adapter()

    metrics: dict[str, Any] = {"mode": mode, "sets": {}}
    for s in todo:
        after = _measure(model, s, "tuned", **measure)
        metrics["sets"][s.name] = _compare(s, before[s.name], after, mode)
        _write_metrics(out_dir, metrics)  # after every set: a long eval that dies keeps what it measured
    return metrics


@dataclass
class _EvalSet:
    name: str
    prompts: list[str]  # rendered with the run's chat template and system prompt
    labels: list[str | list[str]]  # a list where one prompt has several references (E2E)
    pairs: list[Example]  # one (prompt, reference) example per reference, for the loss
    lang: str

    @classmethod
    def of(cls, name: str, examples: list[Example], tok: Any, system_prompt: str | None) -> "_EvalSet":
        refs = [r for ex in examples for r in ex.references]
        return cls(name, [render_prompt(tok, ex.prompt_messages, system_prompt) for ex in examples],
                   [ex.references[0] if len(ex.references) == 1 else list(ex.references) for ex in examples],
                   [Example(ex.prompt_messages + [{"role": "assistant", "content": r}], ex.source, ex.line)
                    for ex in examples for r in ex.references],
                   detect_lang(refs))


def _measure(model: Any, s: _EvalSet, which: str, *, tok: Any, out_dir: Path, max_new_tokens: int,
             batch_size: int, max_length: int, system_prompt: str | None,
             progress: bool) -> tuple[list[str], float | None]:
    """Answers (also written to predictions-<which>-<set>.jsonl) and reference loss of one model."""
    preds = generate_batched(model, tok, s.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             desc=f"{s.name}: {which}", progress=progress)
    write_predictions(out_dir / f"predictions-{which}-{_safe(s.name)}.jsonl", s.prompts, preds, s.labels)
    loss = reference_loss(model, tok, s.pairs, max_length=max_length, system_prompt=system_prompt,
                          batch_size=batch_size)
    return preds, loss


def _compare(s: _EvalSet, before: tuple[list[str], float | None], after: tuple[list[str], float | None],
             mode: str) -> dict[str, Any]:
    """One set's entry of metrics.json (its documented shape: others read it)."""
    b = score_predictions(before[0], s.labels, mode, s.lang)
    a = score_predictions(after[0], s.labels, mode, s.lang)
    return {"lang": s.lang, "n": len(s.prompts), "before": b, "after": a,
            "delta": {k: a[k] - b[k] for k in KEYS}, "loss_before": before[1], "loss_after": after[1]}


def _eval_sets(cfg: Any, cfg_path: Path, names: Sequence[str] | None,
               max_samples: int | None) -> dict[str, list[Example]]:
    """The run's validation sets, rebuilt as training saw them (same seed, same split).

    `max_eval_samples` caps *prompts* here, after the references of a prompt are grouped: capping
    rows first would score 78 of E2E's 630 test prompts for a cap of 600 rows.
    """
    available = build_datasets(dataclasses.replace(cfg, max_eval_samples=None)).val
    if not available:
        raise RunError("the run has no validation sets: set val_data, val_size or general_eval",
                       file=str(cfg_path), field="val_data")
    if names:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise RunError(f"no validation set named {', '.join(map(repr, unknown))} "
                           f"(have: {', '.join(available)})", file=str(cfg_path), field="sets")
        available = {n: available[n] for n in names}
    # One prompt with several references (E2E) is generated once and scored against all of them.
    grouped = {n: group_references(exs) for n, exs in available.items()}
    caps = [c for c in (max_samples, cfg.max_eval_samples) if c]
    return {n: exs[:min(caps)] if caps else exs for n, exs in grouped.items()}


def _safe(name: str) -> str:
    """A set name as a file-name part (val_data keys are free text)."""
    return re.sub(r"[^\w.-]", "_", name)


def _write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "metrics.md").write_text(metrics_table_md(metrics), encoding="utf-8")
