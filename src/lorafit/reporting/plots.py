"""loss.png: the one picture that shows how a run went.

Raw and smoothed training loss, every validation curve by split, the learning rate on a second axis,
and the diagnosis drawn on top: spikes, non-finite steps, the best validation step and a plateau.
Uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global backend and
works headless.
"""
from __future__ import annotations

from pathlib import Path
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..diagnosis import Finding, diagnose_records, read_run, spikes_of
from ..diagnosis.records import RunSeries, build_series
from ..diagnosis.stats import ema
from ..rundir import CHECKPOINTS_JSON, CHECKPOINTS_PNG, EVAL_DIR, LOSS_PLOT

SPLIT_COLORS = ["#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _best_step(s: RunSeries, findings: list[Finding]) -> tuple[str, float, float] | None:
    """(split, step, loss) of the best validation point: overfitting's, else the first split's minimum."""
    for f in findings:
        if f.kind == "overfitting":
            split, step = f.evidence["split"], f.evidence["best_step"]
            return split, float(step), float(f.evidence["best_eval_loss"])
    splits = s.validation_splits()
    if not splits or len(s.evals[splits[0]][1]) < 2:
        return None
    st, y = s.evals[splits[0]]
    i = int(np.argmin(y))
    return splits[0], float(st[i]), float(y[i])


def draw_loss(s: RunSeries, findings: list[Finding], title: str = "") -> Figure:
    """The loss figure for a series and its findings (not saved; see plot_loss)."""
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles = []
    if len(s.loss):
        handles += ax.plot(s.steps, s.loss, color="#1f77b4", alpha=0.3, lw=0.8, label="train loss (raw)")
        span = float(np.clip(len(s.loss) / 20, 1, 50))
        handles += ax.plot(s.steps, ema(s.loss, 2 / (span + 1)), color="#1f77b4", lw=1.8,
                           label="train loss (EMA)")
    for k, (split, (st, y)) in enumerate(s.evals.items()):
        color = "#ff7f0e" if split == "general" else SPLIT_COLORS[k % len(SPLIT_COLORS)]
        handles += ax.plot(st, y, "o-", color=color, ms=3.5, lw=1.4, label=f"eval: {split}")
    spike_steps = spikes_of(findings)
    if spike_steps and len(s.loss):
        ys = np.interp(spike_steps, s.steps, s.loss)
        handles.append(ax.scatter(spike_steps, ys, marker="v", s=60, color="crimson", zorder=5,
                                  label="loss spike"))
    if s.nonfinite_steps:
        lo = float(np.min(s.loss)) if len(s.loss) else 0.0
        handles.append(ax.scatter(s.nonfinite_steps, [lo] * len(s.nonfinite_steps), marker="x", s=50,
                                  color="black", zorder=5, label="non-finite loss"))
    best = _best_step(s, findings)
    if best is not None:
        split, step, loss = best
        ax.axvline(step, color="gray", ls="--", lw=1)
        handles.append(ax.scatter([step], [loss], marker="*", s=160, color="gold", edgecolor="black",
                                  zorder=6, label=f"best {split} (step {int(step)})"))
    for f in findings:
        if f.kind == "plateau" and len(f.steps) == 2:
            ax.axvspan(f.steps[0], f.steps[1], color="gray", alpha=0.12, lw=0)
        if f.kind == "divergence" and len(f.steps) >= 2 and "rise_from_best" in f.evidence:
            ax.axvspan(f.steps[0], f.steps[1], color="red", alpha=0.08, lw=0)
    finite = np.concatenate([s.loss] + [y for _, y in s.evals.values()]) if len(s.loss) or s.evals else np.array([])
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_yscale("log")   # a diverged run would squash the healthy part of the curve
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if s.lr is not None and len(s.lr):
        ax2 = ax.twinx()
        handles += ax2.plot(s.steps, s.lr, color="gray", ls=":", lw=1.2, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if not handles:
        ax.text(0.5, 0.5, "no training or evaluation records yet", ha="center", va="center", transform=ax.transAxes)
    else:   # below the axes, so it never hides a curve
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    rows = (len(handles) + 3) // 4
    fig.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 1))
    return fig


def plot_loss(run_dir: str | Path, findings: list[Finding] | list[dict] | None = None) -> Path:
    """Write RUN/loss.png and return its path; diagnoses the run when no findings are given
    (findings may also be the dicts of a diagnosis.json)."""
    run = Path(run_dir)
    records, metrics, config = read_run(run)
    if findings is None:
        findings = diagnose_records(records, metrics, config)
    findings = [f if isinstance(f, Finding) else Finding.from_dict(f) for f in findings]
    s = build_series(records, config)
    fig = draw_loss(s, findings, title=run.resolve().name)
    out = run / LOSS_PLOT
    fig.savefig(out, format="png", dpi=100)
    return out


def draw_checkpoints(table: dict) -> Figure:
    """Target-set ROUGE-L (left axis) and general-set loss (right axis) per step, with the base model's
    loss, the forgetting budget's line and the selected candidate marked: the trade-off in one picture."""
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    target, g = table.get("target_set"), table.get("general_set")
    rows = sorted([r for r in table.get("checkpoints", []) if r.get("step") is not None], key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["sets"][target]["rouge-l"] for r in rows], "o-", color="#2ca02c", label=f"{target} ROUGE-L")
    ax.axhline(table["base"]["sets"][target]["rouge-l"], color="#2ca02c", ls=":", lw=1, label=f"{target} ROUGE-L, base")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{target} ROUGE-L")
    handles, labels = ax.get_legend_handles_labels()
    sel = (table.get("selected") or {}).get("name")
    picked = next((r for r in rows if r["name"] == sel), None)
    if picked is not None:
        h = ax.scatter([picked["step"]], [picked["sets"][target]["rouge-l"]], marker="*", s=220, color="gold",
                       edgecolor="black", zorder=6, label=f"selected: {sel}")
        handles.append(h)
        labels.append(h.get_label())
    if g:
        ax2 = ax.twinx()
        base = table["base"]["sets"][g]["loss"]
        ax2.plot(steps, [r["sets"][g]["loss"] for r in rows], "s-", color="#ff7f0e", label="general loss")
        ax2.axhline(base, color="#ff7f0e", ls=":", lw=1, label="general loss, base")
        budget = table.get("forgetting_budget", 0.02)
        ax2.axhline(base * (1 + budget), color="#d62728", ls="--", lw=1, label=f"budget (+{100 * budget:g}%)")
        ax2.set_ylabel("general-set loss")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.grid(alpha=0.3)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax.set_title("Checkpoints: domain gain vs general-set loss", fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return fig


def plot_checkpoints(run_dir: str | Path) -> Path | None:
    """Write RUN/eval/checkpoints.png from RUN/eval/checkpoints.json (None when there is no table)."""
    import json

    path = Path(run_dir) / EVAL_DIR / CHECKPOINTS_JSON
    if not path.is_file():
        return None
    table = json.loads(path.read_text(encoding="utf-8"))
    if not table.get("target_set") or not table.get("checkpoints"):
        return None
    out = path.parent / CHECKPOINTS_PNG
    draw_checkpoints(table).savefig(out, format="png", dpi=100)
    return out
