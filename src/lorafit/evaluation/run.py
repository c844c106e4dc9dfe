"""``lorafit eval RUN``: base vs base+adapter on every validation set of a run, written to RUN/eval/.

A readable sequence over the package's parts: read the run's config and sets; load the base once and
wrap it with the adapter; pass 1, adapter disabled (PEFT's ``disable_adapter()``): the base model's
answers and reference loss on every set; pass 2, adapter merged: the tuned model's; then score both
and write predictions, metrics.json and metrics.md. One object serves both rows, so they share
weights, tokenizer and prompts exactly. Every delta carries its paired bootstrap interval and
permutation p-value (stats.py), every set its generation health (health.py) and its most improved and
most regressed prompts (flips.py).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..data import Example, build_datasets, ensure_template, group_references, render_prompt
from .. import rundir as R
from ..errors import ConfigError, RunError
from ..model import load_adapter, load_model, load_tokenizer
from .benchmarks import compare_benchmarks, load_benchmarks
from .flips import FLIPS, top_flips
from .generate import generate_batched
from .health import health
from .loss import reference_nll
from .metrics import KEYS, MODES, detect_lang, example_stats
from .predictions import write_predictions
from .stats import PERMUTATIONS, RESAMPLES, SEED, loss_stats, paired_summary
from .table import metrics_table_md

STATS_INFO = {"interval": "paired percentile bootstrap over prompts (95%)", "resamples": RESAMPLES, "seed": SEED,
              "test": "paired permutation test (base/tuned swapped per prompt), two-sided",
              "permutations": PERMUTATIONS}


def evaluate_run(run_dir: str | Path, *, max_new_tokens: int | None = None, batch_size: int | None = None,
                 max_samples: int | None = None, mode: str | None = None, sets: Sequence[str] | None = None,
                 device: str = "auto", progress: bool = True, flips: int = FLIPS,
                 benchmarks: Sequence[str] | None = None, shots: Sequence[int] = (0,)) -> dict[str, Any]:
    """Evaluate a run folder; writes RUN/eval/* and returns the metrics.json dict.

    None arguments take the run's config (``max_new_tokens``, ``eval_batch_size``, ``metric_mode``);
    ``max_samples`` caps prompts per set (after grouping references); ``sets`` picks sets by name;
    ``flips``: how many most-improved and most-regressed prompts each set lists; ``benchmarks`` (default:
    the config's) are multiple-choice folders scored ``shots``-shot (evaluate/benchmarks.py).
    """
    run = Path(run_dir)
    cfg, cfg_path = R.read_config(run), run / R.CONFIG
    mode = mode or cfg.metric_mode
    if mode not in MODES:
        raise ConfigError(f"unknown metric mode {mode!r}; expected one of {MODES}", field="mode")
    max_new_tokens = max_new_tokens or cfg.max_new_tokens
    batch_size = batch_size or cfg.eval_batch_size
    chosen = eval_sets(cfg, cfg_path, sets, max_samples)
    benches = load_benchmarks(cfg.benchmarks if benchmarks is None else benchmarks, shots)  # before the model loads

    tok = ensure_template(load_tokenizer(cfg.model), cfg.template)
    model = load_adapter(load_model(cfg.model, device=device, dtype=cfg.dtype), run / R.ADAPTER)
    model.eval()  # no LoRA dropout while measuring
    todo = [EvalSet.of(name, exs, tok, cfg.system_prompt) for name, exs in chosen.items()]
    out_dir = run / R.EVAL_DIR
    opts = dict(tok=tok, out_dir=out_dir, max_new_tokens=max_new_tokens, batch_size=batch_size,
                max_length=cfg.max_length, system_prompt=cfg.system_prompt, progress=progress)

    with model.disable_adapter():  # the LoRA path is skipped: these are the base model's numbers
        before = {s.name: measure(model, s, "base", **opts) for s in todo}
    scored = compare_benchmarks(model, tok, benches, batch_size=batch_size, out_dir=out_dir, progress=progress)
    # Tuned = adapter merged into the weights: the model `lorafit merge` ships, and one matmul per
    # layer instead of three. Merging in place is safe: the base pass is done and nothing is saved.
    model.merge_adapter()

    metrics: dict[str, Any] = {"mode": mode, "stats": STATS_INFO, "sets": {}, **({"benchmarks": scored} if scored else {})}
    for s in todo:
        after = measure(model, s, "tuned", **opts)
        metrics["sets"][s.name] = compare(s, before[s.name], after, mode, flips=flips)
        write_metrics(out_dir, metrics)  # after every set: a long eval that dies keeps what it measured
    return metrics


@dataclass
class EvalSet:
    """One validation set as eval sees it: rendered prompts, grouped references, loss pairs."""

    name: str
    prompts: list[str]  # rendered with the run's chat template and system prompt
    labels: list[str | list[str]]  # a list where one prompt has several references (E2E)
    pairs: list[Example]  # one (prompt, reference) example per reference, for the loss
    owner: list[int]  # owner[j]: the prompt that pair j belongs to
    questions: list[str]  # the user's own text of each prompt (language checks, flips, reports)
    lang: str

    @classmethod
    def of(cls, name: str, examples: list[Example], tok: Any, system_prompt: str | None) -> "EvalSet":
        refs = [r for ex in examples for r in ex.references]
        return cls(name, [render_prompt(tok, ex.prompt_messages, system_prompt) for ex in examples],
                   [ex.references[0] if len(ex.references) == 1 else list(ex.references) for ex in examples],
                   [Example(ex.prompt_messages + [{"role": "assistant", "content": r}], ex.source, ex.line)
                    for ex in examples for r in ex.references],
                   [i for i, ex in enumerate(examples) for _ in ex.references],
                   [_question(ex.prompt_messages) for ex in examples], detect_lang(refs))


@dataclass
class Measured:
    """One model's answers to one set: texts, whether each ran out of tokens, per-prompt loss."""

    preds: list[str]
    no_eos: list[bool]
    nll: list[float]     # summed over the prompt's references' answer tokens
    tokens: list[int]
    fits: list[bool] | None = None  # per prompt: its references' mean answer length < max_new_tokens

    @property
    def loss(self) -> float | None:
        return sum(self.nll) / sum(self.tokens) if sum(self.tokens) else None


def measure(model: Any, s: EvalSet, which: str, *, tok: Any, out_dir: Path | None, max_new_tokens: int,
            batch_size: int, max_length: int, system_prompt: str | None, progress: bool,
            generate: bool = True) -> Measured:
    """Answers (also written to predictions-<which>-<set>.jsonl when out_dir is given) and per-prompt
    reference loss of one model; ``generate=False`` measures the loss only."""
    no_eos: list[bool] = []
    preds = (generate_batched(model, tok, s.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              desc=f"{s.name}: {which}", progress=progress, no_eos=no_eos)
             if generate else [])
    per_pair = reference_nll(model, tok, s.pairs, max_length=max_length, system_prompt=system_prompt,
                             batch_size=batch_size)
    nll, count, refs = [0.0] * len(s.prompts), [0] * len(s.prompts), [0] * len(s.prompts)
    for j, (v, c) in zip(s.owner, per_pair):
        nll[j] += v
        count[j] += c
        refs[j] += 1
    # Whether a complete answer as long as the references could end within the generation budget: where
    # it cannot, stopping at max_new_tokens is the budget's doing, not the model's (health: no_eos_fitting).
    fits = [c / max(r, 1) < max_new_tokens for c, r in zip(count, refs)]
    if out_dir is not None and generate:
        write_predictions(out_dir / R.predictions_name(which, s.name), s.prompts, preds, s.labels,
                          [{"no_eos": e, "loss_sum": v, "loss_tokens": c} for e, v, c in zip(no_eos, nll, count)])
    return Measured(preds, no_eos, nll, count, fits)


def compare(s: EvalSet, before: Measured, after: Measured, mode: str, *, flips: int = FLIPS) -> dict[str, Any]:
    """One set's entry of metrics.json (its documented shape, docs/evaluation.md: others read it)."""
    b = example_stats(before.preds, s.labels, mode, s.lang)
    a = example_stats(after.preds, s.labels, mode, s.lang)
    tests = {k: paired_summary(b[k], a[k]) for k in KEYS}
    entry: dict[str, Any] = {
        "lang": s.lang, "n": len(s.prompts), "before": {k: b[k].point for k in KEYS},
        "after": {k: a[k].point for k in KEYS}, "delta": {k: a[k].point - b[k].point for k in KEYS},
        "delta_ci95": {k: tests[k]["delta_ci95"] for k in KEYS}, "p_value": {k: tests[k]["p_value"] for k in KEYS},
        "loss_before": before.loss, "loss_after": after.loss, "loss_delta": None, "loss_delta_ci95": None,
        "loss_p_value": None}
    if before.loss is not None and after.loss is not None:
        lt = paired_summary(loss_stats(before.nll, before.tokens), loss_stats(after.nll, after.tokens))
        entry.update(loss_delta=after.loss - before.loss, loss_delta_ci95=lt["delta_ci95"], loss_p_value=lt["p_value"])
    entry["health"] = {"before": health(s.questions, before.preds, s.labels, before.no_eos, before.fits),
                       "after": health(s.questions, after.preds, s.labels, after.no_eos, after.fits)}
    entry["flips"] = top_flips(s.questions, s.labels, before.preds, after.preds, b["rouge-l"].values,
                               a["rouge-l"].values, n=flips)
    return entry


def _question(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


def eval_sets(cfg: Any, cfg_path: Path, names: Sequence[str] | None,
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


_eval_sets = eval_sets  # its former name


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    """metrics.json and metrics.md into RUN/eval (or the --out folder of `lorafit eval --adapter`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / R.METRICS_JSON).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / R.METRICS_MD).write_text(metrics_table_md(metrics), encoding="utf-8")
