"""``lorafit eval RUN --checkpoints [--select]``: which adapter to keep?

Every kept checkpoint (``RUN/checkpoints/step-N``, verified against its manifest), the best adapter
(``RUN/best-adapter``, while early stopping keeps one) and the final adapter (``RUN/adapter``) are
evaluated on the run's sets, beside the base model: ROUGE/BLEU and reference loss per set. The model
is loaded once; each candidate's LoRA weights are copied into it, so only the weights differ.

``select`` then keeps the candidate with the best ROUGE-L on the first validation set among those
whose general-set loss is at most ``forgetting_budget`` (relative, config key; default 0.02 = +2%)
above the base model's, and ``export_selected`` writes it as ``RUN/selected-adapter/`` in PEFT format.
The rule trades the two things the write-up asks about: the domain gain, and what it cost on general
ability. Written to ``RUN/eval/checkpoints.json`` and ``checkpoints.md`` (the plot: report/plots.py).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .. import rundir as R
from ..data import ensure_template
from ..errors import RunError
from ..model import load_adapter, load_model, load_tokenizer
from ..training.checkpoint import list_checkpoints, verify
from .metrics import MODES, score_predictions
from .run import EvalSet, eval_sets, measure
from .table import GENERAL

SELECTED = R.SELECTED_ADAPTER
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class Candidate:
    name: str          # "step-300", "best", "final"
    kind: str          # "checkpoint" | "best" | "final"
    step: int | None
    path: Path


def candidates(run: Path) -> list[Candidate]:
    """Intact checkpoints (oldest first), then best-adapter and adapter when present."""
    import warnings

    out = []
    for ckpt in list_checkpoints(run / R.CHECKPOINTS):
        problem = verify(ckpt)
        if problem is not None:
            warnings.warn(f"skipping damaged checkpoint {ckpt}: {problem}", stacklevel=2)
            continue
        out.append(Candidate(ckpt.name, "checkpoint", int(ckpt.name.split("-", 1)[1]), ckpt))
    end = _end_event(run)
    if (run / R.BEST_ADAPTER / ADAPTER_FILE).is_file():
        out.append(Candidate("best", "best", end.get("best_step"), run / R.BEST_ADAPTER))
    if (run / R.ADAPTER / ADAPTER_FILE).is_file():
        early = bool(R.read_config(run).early_stopping_patience) and end.get("best_step") is not None
        out.append(Candidate("final", "final", end.get("best_step") if early else end.get("step"), run / R.ADAPTER))
    if not out:
        raise RunError("no checkpoints and no adapter to evaluate", file=str(run))
    return out


def peft_weights(c: Candidate) -> dict[str, Any]:
    """A candidate's LoRA weights under PEFT's saved names (a checkpoint stores the live parameter
    names, which carry the adapter name: PEFT drops it when saving, so do we)."""
    from safetensors.torch import load_file

    if c.kind == "checkpoint":
        return {k.replace(".default", ""): v for k, v in load_file(str(c.path / R.CKPT_WEIGHTS)).items()}
    return load_file(str(c.path / ADAPTER_FILE))


def evaluate_checkpoints(run_dir: str | Path, *, max_new_tokens: int | None = None, batch_size: int | None = None,
                         max_samples: int | None = None, mode: str | None = None, sets: Sequence[str] | None = None,
                         device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Evaluate base + every candidate; writes RUN/eval/checkpoints.json and .md, returns the table."""
    from peft import set_peft_model_state_dict

    run = Path(run_dir)
    cfg = R.read_config(run)
    mode = mode or cfg.metric_mode
    if mode not in MODES:
        raise RunError(f"unknown metric mode {mode!r}; expected one of {MODES}", field="mode")
    cands = candidates(run)
    tok = ensure_template(load_tokenizer(cfg.model), cfg.template)
    model = load_adapter(load_model(cfg.model, device=device, dtype=cfg.dtype), cands[-1].path)
    model.eval()
    todo = [EvalSet.of(n, exs, tok, cfg.system_prompt)
            for n, exs in eval_sets(cfg, run / R.CONFIG, sets, max_samples).items()]
    opts = dict(tok=tok, out_dir=None, max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                batch_size=batch_size or cfg.eval_batch_size, max_length=cfg.max_length,
                system_prompt=cfg.system_prompt, progress=progress)
    names = [s.name for s in todo]
    target = next((n for n in names if n != GENERAL), None)
    table: dict[str, Any] = {"mode": mode, "target_set": target, "general_set": GENERAL if GENERAL in names else None,
                             "forgetting_budget": cfg.forgetting_budget, "checkpoints": []}
    with model.disable_adapter():
        table["base"] = {"name": "base", "kind": "base", "step": 0, "sets": _scores(model, todo, "base", mode, opts)}
    for c in cands:
        result = set_peft_model_state_dict(model, {k: v.to(next(model.parameters()).device) for k, v in peft_weights(c).items()})
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if getattr(result, "unexpected_keys", None) or missing:
            raise RunError(f"{c.name} does not fit the run's adapter (different LoRA settings?)", file=str(c.path))
        table["checkpoints"].append({"name": c.name, "kind": c.kind, "step": c.step,
                                     "sets": _scores(model, todo, c.name, mode, opts)})
    _add_rise(table)
    write_table(run, table)
    return table


def _scores(model: Any, todo: list[EvalSet], which: str, mode: str, opts: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for s in todo:
        m = measure(model, s, which, **opts)
        out[s.name] = {**score_predictions(m.preds, s.labels, mode, s.lang), "loss": m.loss}
    return out


def _add_rise(table: dict[str, Any]) -> None:
    g = table.get("general_set")
    base = table["base"]["sets"].get(g, {}).get("loss") if g else None
    for r in table["checkpoints"]:
        loss = r["sets"].get(g, {}).get("loss") if g else None
        r["general_loss_rise"] = loss / base - 1 if base and loss is not None else None


def select(table: dict[str, Any], budget: float | None = None) -> dict[str, Any]:
    """The candidate to keep and why: best target-set ROUGE-L among those whose general-set loss
    rose at most ``budget`` (relative) over the base. Ties go to the earlier step. Pure: reads the table only."""
    budget = table.get("forgetting_budget", 0.02) if budget is None else budget
    target, rows = table.get("target_set"), table.get("checkpoints") or []
    if not target or not rows:
        return {"name": None, "reason": "nothing to select: no target set or no candidates"}
    _add_rise(table)
    ok = [r for r in rows if r.get("general_loss_rise") is None or r["general_loss_rise"] <= budget + 1e-12]
    has_general = any(r.get("general_loss_rise") is not None for r in rows)
    if not ok:
        least = min(rows, key=lambda r: r["general_loss_rise"])
        return {"name": None, "budget": budget, "reason": (
            f"no candidate keeps the general-set loss within +{100 * budget:g}% of the base model's; the smallest "
            f"rise is {100 * least['general_loss_rise']:+.1f}% ({least['name']}). Mix general data into training "
            "(general_data, general_ratio), lower the learning rate, or raise forgetting_budget.")}
    key = lambda r: (r["sets"][target]["rouge-l"], -(r["step"] if r["step"] is not None else 1 << 60))  # noqa: E731
    best = max(ok, key=key)
    rl = best["sets"][target]["rouge-l"]
    excluded = [r["name"] for r in rows if r not in ok]
    if has_general:
        why = (f"best {target} ROUGE-L ({rl:.2f}) among the {len(ok)} of {len(rows)} candidates whose general-set loss "
               f"is within +{100 * budget:g}% of the base model's {table['base']['sets'][table['general_set']]['loss']:.3f} "
               f"(its own rise: {100 * best['general_loss_rise']:+.1f}%)")
        if excluded:
            why += "; over budget: " + ", ".join(excluded)
        beat = [r for r in rows if r not in ok and r["sets"][target]["rouge-l"] > rl]
        if beat:
            top = max(beat, key=key)
            why += (f". {top['name']} scores higher ({top['sets'][target]['rouge-l']:.2f}) but raises the general loss "
                    f"{100 * top['general_loss_rise']:+.1f}%")
    else:
        why = f"best {target} ROUGE-L ({rl:.2f}); the run has no general set, so forgetting was not checked"
    return {"name": best["name"], "kind": best["kind"], "step": best["step"], "budget": budget, "reason": why + "."}


def export_selected(run_dir: str | Path, choice: dict[str, Any]) -> Path:
    """Write the chosen candidate to RUN/selected-adapter/ (PEFT format: adapter_config.json from the
    run's adapter, the chosen weights), through a temporary folder and a rename."""
    from safetensors.torch import save_file

    run = Path(run_dir)
    cand = next((c for c in candidates(run) if c.name == choice.get("name")), None)
    if cand is None:
        raise RunError(f"candidate {choice.get('name')!r} is no longer in the run folder", file=str(run))
    out, tmp = run / SELECTED, run / f".{SELECTED}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copy2(run / R.ADAPTER / "adapter_config.json", tmp / "adapter_config.json")
    save_file({k: v.contiguous() for k, v in peft_weights(cand).items()}, str(tmp / ADAPTER_FILE))
    (tmp / R.SELECTED_CHOICE).write_text(json.dumps(choice, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def checkpoints_and_select(run_dir: str | Path, *, evaluate: bool = True, choose: bool = False,
                           **kwargs: Any) -> dict[str, Any]:
    """The ``--checkpoints`` / ``--select`` command: evaluate the candidates (or, for ``--select`` alone,
    reuse RUN/eval/checkpoints.json when it exists), then optionally select and export one."""
    run = Path(run_dir)
    saved = run / R.EVAL_DIR / R.CHECKPOINTS_JSON
    if evaluate or not saved.is_file():
        table = evaluate_checkpoints(run, **kwargs)
    else:
        try:
            table = json.loads(saved.read_text(encoding="utf-8"))
        except ValueError as e:
            raise RunError(f"unreadable checkpoints table ({e}); rerun with --checkpoints", file=str(saved)) from None
    if choose:
        table["selected"] = select(table, R.read_config(run).forgetting_budget)
        if table["selected"].get("name"):
            table["selected"]["path"] = str(export_selected(run, table["selected"]))
        write_table(run, table)
    return table


def write_table(run: Path, table: dict[str, Any]) -> None:
    d = run / R.EVAL_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / R.CHECKPOINTS_JSON).write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (d / R.CHECKPOINTS_MD).write_text(checkpoints_table_md(table), encoding="utf-8")


def checkpoints_table_md(table: dict[str, Any]) -> str:
    """Target-set metrics and general-set loss per candidate, the selection (if any) below."""
    target, g = table.get("target_set"), table.get("general_set")
    head = ["candidate", "step", f"{target} ROUGE-L", f"{target} BLEU-4", f"{target} loss"]
    if g:
        head += ["general ROUGE-L", "general loss", "general loss vs base"]
    lines = ["# Checkpoints: domain gain vs general-set loss", "",
             "| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for r in [table["base"]] + table["checkpoints"]:
        t = r["sets"].get(target, {})
        cells = [r["name"], "–" if r["step"] is None else str(r["step"]), _n(t.get("rouge-l")), _n(t.get("bleu-4")),
                 _n(t.get("loss"), 3)]
        if g:
            gs = r["sets"].get(g, {})
            rise = r.get("general_loss_rise")
            cells += [_n(gs.get("rouge-l")), _n(gs.get("loss"), 3), "–" if rise is None else f"{100 * rise:+.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    sel = table.get("selected")
    if sel:
        lines += ["", f"**Selected:** {sel.get('name') or 'none'}: {sel.get('reason')}"]
    return "\n".join(lines) + "\n"


def _n(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _end_event(run: Path) -> dict[str, Any]:
    """The training log's last "end" event (best_step, step), or {}."""
    log = run / R.LOG
    end: dict[str, Any] = {}
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") == R.END:
                end = rec
    return end


__all__ = ["Candidate", "candidates", "checkpoints_table_md", "evaluate_checkpoints", "export_selected",
           "select", "write_table"]
