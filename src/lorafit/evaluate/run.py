"""``lorafit eval RUN``: base vs base+adapter on every validation set of a run, written to RUN/eval/.

A readable sequence over the package's parts: read the run's config and sets, load the base once and
wrap it with the adapter (PEFT's ``disable_adapter()`` gives the base model's outputs from the same
object, so both rows use identical weights, tokenizer and prompts), then per set generate, score and
measure reference loss before and after, and write predictions, metrics.json and metrics.md.
"""
from __future__ import annotations

import json
import re
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

    out_dir = run / "eval"
    metrics: dict[str, Any] = {"mode": mode, "sets": {}}
    for name, examples in eval_sets.items():
        prompts = [render_prompt(tok, ex.prompt_messages, cfg.system_prompt) for ex in examples]
        labels = [ex.references[0] if len(ex.references) == 1 else list(ex.references) for ex in examples]
        pairs = _one_per_reference(examples)
        lang = detect_lang([r for ex in examples for r in ex.references])
        gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        loss = dict(max_length=cfg.max_length, system_prompt=cfg.system_prompt, batch_size=batch_size)
        with model.disable_adapter():
            base = generate_batched(model, tok, prompts, desc=f"{name}: base", **gen)
            loss_before = reference_loss(model, tok, pairs, **loss)
        tuned = generate_batched(model, tok, prompts, desc=f"{name}: tuned", **gen)
        loss_after = reference_loss(model, tok, pairs, **loss)

        safe = re.sub(r"[^\w.-]", "_", name)
        write_predictions(out_dir / f"predictions-base-{safe}.jsonl", prompts, base, labels)
        write_predictions(out_dir / f"predictions-tuned-{safe}.jsonl", prompts, tuned, labels)
        before = score_predictions(base, labels, mode, lang)
        after = score_predictions(tuned, labels, mode, lang)
        metrics["sets"][name] = {
            "lang": lang, "n": len(examples), "before": before, "after": after,
            "delta": {k: after[k] - before[k] for k in KEYS},
            "loss_before": loss_before, "loss_after": loss_after,
        }
        _write_metrics(out_dir, metrics)  # after every set: a long eval that dies keeps what it measured
    return metrics


def _eval_sets(cfg: Any, cfg_path: Path, names: Sequence[str] | None,
               max_samples: int | None) -> dict[str, list[Example]]:
    """The run's validation sets, rebuilt exactly as training saw them (same seed, same split)."""
    available = build_datasets(cfg).val
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
    return {n: exs[:max_samples] if max_samples else exs for n, exs in grouped.items()}


def _one_per_reference(examples: list[Example]) -> list[Example]:
    """Loss is measured on every (prompt, reference) pair, not only the first reference."""
    return [Example(ex.prompt_messages + [{"role": "assistant", "content": ref}], ex.source, ex.line)
            for ex in examples for ref in ex.references]


def _write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "metrics.md").write_text(metrics_table_md(metrics), encoding="utf-8")
