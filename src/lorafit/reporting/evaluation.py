"""The report's evaluation sections, read from eval/metrics.json and eval/checkpoints.json: deltas with
their 95% intervals and p-values, generation health, the most improved and regressed prompts, and
the checkpoint sweep. Each returns report blocks (render.py's Block); an absent field renders nothing,
so metrics.json files written before these fields existed still make a report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import rundir as R
from ..evaluation.health import FIELDS
from ..evaluation.table import fmt_delta, fmt_p

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def metrics_blocks(run: Path, metrics: dict | None) -> list[tuple]:
    sets = (metrics or {}).get("sets")
    if not (isinstance(sets, dict) and sets):
        md = run / R.EVAL_DIR / R.METRICS_MD
        if md.is_file():
            return [("h2", "Evaluation metrics"), ("pre", md.read_text(encoding="utf-8", errors="replace"))]
        return [("h2", "Evaluation metrics"), ("p", "No eval/metrics.json yet: run `lorafit eval` on this run folder.")]
    rows = []
    for name, v in sets.items():
        if not isinstance(v, dict):
            continue
        before, after, delta = v.get("before") or {}, v.get("after") or {}, v.get("delta") or {}
        cis, ps = v.get("delta_ci95") or {}, v.get("p_value") or {}
        for m in [m for m in METRICS if m in before or m in after] + sorted(set(before) - set(METRICS)):
            d = delta.get(m)
            rows.append([name, v.get("lang", ""), v.get("n", ""), m, before.get(m), after.get(m),
                         fmt_delta(d, cis.get(m)) if isinstance(d, (int, float)) else d, fmt_p(ps.get(m)) if ps else ""])
        lb, la = v.get("loss_before"), v.get("loss_after")
        if isinstance(lb, (int, float)) and isinstance(la, (int, float)):
            rows.append([name, v.get("lang", ""), v.get("n", ""), "loss", lb, la,
                         fmt_delta(la - lb, v.get("loss_delta_ci95"), 3), fmt_p(v.get("loss_p_value"))
                         if "loss_p_value" in v else ""])
    mode, stats = (metrics or {}).get("mode"), (metrics or {}).get("stats") or {}
    text = f"Before = base model, after = with the adapter; metric mode: {mode or 'unknown'}."
    if stats:
        text += (f" Delta [95% interval]: {stats.get('interval')}, {stats.get('resamples')} resamples (seed "
                 f"{stats.get('seed')}); p: {stats.get('test')}. An interval that excludes 0 is a change "
                 "the prompts' sampling noise does not explain.")
    return [("h2", "Evaluation metrics"), ("p", text),
            ("table", ["set", "lang", "n", "metric", "before", "after", "delta [95% CI]", "p"], rows)]


def health_blocks(metrics: dict | None) -> list[tuple]:
    sets = (metrics or {}).get("sets") or {}
    rows = []
    for name, v in sets.items():
        h = v.get("health") if isinstance(v, dict) else None
        if not isinstance(h, dict):
            continue
        for side in ("before", "after"):
            if isinstance(h.get(side), dict):
                rows.append([name, side] + [_share(h[side].get(k)) for k in FIELDS])
    if not rows:
        return []
    return [("h2", "Generation health"),
            ("p", "Shares of answers (0-1): no_eos = stopped at max_new_tokens without end-of-sequence; "
                  "repetition = a looping n-gram; empty; template_leak = chat-template or special-token text; "
                  "language_mismatch = answered in the other language; long_references = references at least "
                  "max_new_tokens long (answers like them cannot end within the budget). length_ratio = median answer/reference "
                  "length (1 = as long as the references). A share that rises after tuning is a problem the "
                  "fine-tune introduced (see Diagnosis)."),
            ("table", ["set", "model", *FIELDS], rows)]


def flips_blocks(metrics: dict | None) -> list[tuple]:
    """Per set: the prompts whose ROUGE-L rose and fell most, with both answers (any language)."""
    sets = (metrics or {}).get("sets") or {}
    out: list[tuple] = []
    for name, v in sets.items():
        f = v.get("flips") if isinstance(v, dict) else None
        if not isinstance(f, dict) or not (f.get("improved") or f.get("regressed")):
            continue
        for title, key in (("improved most", "improved"), ("regressed most", "regressed")):
            rows = [[r.get("prompt"), _ref(r.get("reference")), r.get("before"), r.get("after"),
                     f"{r.get('score_before', 0):.1f} → {r.get('score_after', 0):.1f} ({r.get('delta', 0):+.1f})"]
                    for r in f.get(key) or []]
            if rows:
                out += [("p", f"Set '{name}': {len(rows)} prompts whose {f.get('metric', 'rouge-l').upper()} "
                              f"{title}."),
                        ("table", ["prompt", "reference", "before (base)", "after (tuned)", f.get("metric", "score")], rows)]
    return [("h2", "Per-prompt flips")] + out if out else []


def checkpoint_blocks(run: Path) -> list[tuple]:
    """The --checkpoints table, its plot and the --select decision, when the run has them."""
    path = run / R.EVAL_DIR / R.CHECKPOINTS_JSON
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    target, g = table.get("target_set"), table.get("general_set")
    if not target or not table.get("checkpoints"):
        return []
    head = ["candidate", "step", f"{target} ROUGE-L", f"{target} loss"] + (["general loss", "vs base"] if g else [])
    rows = []
    for r in [table["base"]] + table["checkpoints"]:
        t = r["sets"].get(target, {})
        row = [r["name"], r.get("step"), t.get("rouge-l"), t.get("loss")]
        if g:
            rise = r.get("general_loss_rise")
            row += [r["sets"].get(g, {}).get("loss"), "" if rise is None else f"{100 * rise:+.1f}%"]
        rows.append(row)
    out: list[tuple] = [("h2", "Checkpoints"), ("table", head, rows)]
    png = run / R.EVAL_DIR / R.CHECKPOINTS_PNG
    if png.is_file():
        out.append(("img", png.read_bytes(), "checkpoints: domain gain vs general-set loss",
                    f"{R.EVAL_DIR}/{R.CHECKPOINTS_PNG}"))
    sel = table.get("selected")
    if isinstance(sel, dict):
        out.append(("p", f"Selected: {sel.get('name') or 'none'}. {sel.get('reason', '')}"))
    return out


def _share(v: Any) -> Any:
    return "–" if v is None else round(float(v), 3)


def _ref(r: Any) -> Any:
    return " / ".join(r) if isinstance(r, list) else r
