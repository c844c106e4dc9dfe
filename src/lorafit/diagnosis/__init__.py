"""`lorafit diagnose`: read a run's log (and eval metrics) and say, with evidence, what went wrong.

    findings = diagnose_run("runs/demo", write_config="runs/demo/fixed.yaml")
    print(format_findings(findings))

Detectors look at the training curve (spikes, noise, divergence/NaN, flat loss, gradient norm,
warmup) and at validation curves and metrics (overfitting, plateau, forgetting). Each finding carries
the steps, the numbers, an explanation, a fix and a patch of TrainConfig keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import load_config, save_config
from ..errors import RunError
from ..rundir import CONFIG, DIAGNOSIS
from .detectors import (detect_divergence, detect_flat_loss, detect_fluctuation, detect_grad_explosion,
                        detect_warmup, early_window_end, find_spikes)
from .findings import SEVERITIES, Finding, format_findings, sort_findings
from .generalization import detect_forgetting, detect_overfitting, detect_plateau, detect_setup
from .health import detect_generation_health
from .patches import check_target, merge_patches, tool_patches, write_tool_config
from .records import MIN_TRAIN_RECORDS, build_series
from .sources import LORAFIT, RunSource, load_source

__all__ = ["Finding", "SEVERITIES", "RunSource", "diagnose_records", "diagnose_run", "format_findings",
           "load_source", "merge_patches", "read_run", "write_patched_config", "spikes_of"]


def diagnose_records(records: list[dict[str, Any]], metrics: dict[str, Any] | None = None,
                     config: dict[str, Any] | None = None) -> list[Finding]:
    """All findings for a log's records (most severe first). Pure: reads and writes no files."""
    s = build_series(records, config)
    spikes = find_spikes(s)
    warm = detect_warmup(s, spikes)
    early_end = early_window_end(s) if warm is not None and warm.severity != "info" else None
    div = detect_divergence(s, early_end)
    diverged = div is not None and "rise_from_best" in div.evidence
    # One cause, one finding: early spikes belong to a too-short warmup, late ones to a divergence,
    # and gradient spikes at a loss spike to that spike.
    if early_end is not None:
        spikes = [p for p in spikes if p["step"] > early_end]
    if diverged:
        spikes = [p for p in spikes if p["step"] < div.steps[0]]
    L = s.logging_steps
    explained = [(p["step"] - L, p["step"] + L) for p in spikes]
    if early_end is not None:
        explained.append((0, early_end))
    if diverged:
        explained.append((div.steps[0], float("inf")))
    findings = [f for f in (div, warm, detect_fluctuation(s, spikes, judge_noise=not diverged),
                            detect_grad_explosion(s, explained),
                            None if diverged else detect_flat_loss(s)) if f is not None]
    over = detect_overfitting(s)
    if diverged:   # validation rising after the training loss diverged is the divergence, not overfitting
        over = [f for f in over if f.evidence["best_step"] < div.steps[0] - s.eval_steps]
    findings += over
    findings += detect_plateau(s, {f.evidence["split"] for f in over})
    forget = detect_forgetting(s, metrics)
    if forget is not None:
        findings.append(forget)
    findings += detect_setup(s)
    findings += detect_generation_health(metrics)
    if len(s.steps) < MIN_TRAIN_RECORDS:   # never an all-clear on a handful of numbers
        findings.append(Finding(
            "insufficient_data", "info",
            f"only {len(s.steps)} training loss record{'s' if len(s.steps) != 1 else ''}: too few for a verdict",
            f"Telling a trend from noise, a spike from a wiggle or a plateau from a slow descent needs at least "
            f"{MIN_TRAIN_RECORDS} logged losses; nothing found here does not mean nothing is wrong.",
            "Log more often (logging_steps) or train longer, then diagnose again.",
            evidence={"train_records": int(len(s.steps)), "needed": MIN_TRAIN_RECORDS}))
    return sort_findings(findings)


def spikes_of(findings: list[Finding]) -> list[int]:
    """Steps of the loss spikes among findings (for plot markers)."""
    return [int(p["step"]) for f in findings if f.kind == "fluctuation" for p in f.evidence.get("spikes", [])]


def read_run(run_dir: str | Path, config: str | Path | None = None
             ) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any]]:
    """(log records, eval metrics or None, config under lorafit's names) of a run folder or log file of
    lorafit, LLaMA-Factory or HF Trainer (see sources.py); a log without train records reads as empty."""
    src = load_source(run_dir, config, require_train=False)
    return src.records, src.metrics, src.config


def diagnose_run(run_dir: str | Path, write_config: str | Path | None = None,
                 config: str | Path | None = None) -> list[Finding]:
    """Diagnose a run (lorafit's, LLaMA-Factory's, HF Trainer's: folder or log file), write diagnosis.json
    beside it, and optionally the fixed config. `config`: the launch YAML, when not in the folder.

    diagnosis.json is a JSON list of findings (kind, severity, summary, explanation, fix, steps,
    evidence, config_patch) so other tools (report, a CI gate) need not re-run the analysis. For
    another tool's run, config_patch and the written config use that tool's keys.
    """
    src = load_source(run_dir, config)
    findings = diagnose_records(src.records, src.metrics, src.config)
    if src.kind != LORAFIT:
        total = build_series(src.records, src.config).total_steps or None
        shown = tool_patches(findings, src.kind, src.tool_config, total)
    else:
        shown = findings
        cfg_path = Path(config) if config is not None else src.folder / CONFIG
        if write_config is not None and not cfg_path.is_file():
            raise RunError("no config.yaml to patch (a run folder written by `lorafit train` has one)",
                           file=str(cfg_path))
    if write_config is not None:   # before diagnosis.json: a bad target writes nothing
        write_config = check_target(write_config)
    try:
        (src.folder / DIAGNOSIS).write_text(
            json.dumps([f.to_dict() for f in shown], indent=2, ensure_ascii=False, allow_nan=False) + "\n",
            encoding="utf-8")
    except OSError as e:
        raise RunError(f"cannot write diagnosis.json: {e.strerror or e}", file=str(src.folder)) from None
    if write_config is not None:
        if src.kind == LORAFIT:
            write_patched_config(src.folder, findings, write_config, config_file=cfg_path)
        else:
            write_tool_config(findings, write_config, src.kind, src.tool_config, src.tool_config_file, total)
    return shown


def write_patched_config(run_dir: str | Path, findings: list[Finding], out: str | Path,
                         config_file: str | Path | None = None) -> dict[str, Any]:
    """RUN/config.yaml (or config_file) with every finding's patch applied (merged conservatively),
    validated and saved ready for `lorafit train`. Returns the merged patch."""
    cfg_path = Path(config_file) if config_file is not None else Path(run_dir) / CONFIG
    if not cfg_path.is_file():
        raise RunError("no config.yaml to patch (a run folder written by `lorafit train` has one)", file=str(cfg_path))
    patch = merge_patches(findings)
    cfg = load_config(cfg_path, overrides=patch)
    out = check_target(out)
    try:
        save_config(cfg, out)
    except OSError as e:
        out.with_name(f".{out.name}.tmp").unlink(missing_ok=True)   # save_config's temp file
        raise RunError(f"cannot write the config: {e.strerror or e}", file=str(out)) from None
    return patch
