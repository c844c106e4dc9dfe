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

import yaml

from ..config import load_config, save_config
from ..errors import RunError
from .detectors import (detect_divergence, detect_flat_loss, detect_fluctuation, detect_grad_explosion,
                        detect_warmup, early_window_end, find_spikes)
from .findings import SEVERITIES, Finding, format_findings, sort_findings
from .generalization import detect_forgetting, detect_overfitting, detect_plateau, detect_setup
from .health import detect_generation_health
from .patches import merge_patches
from .records import build_series, read_log

__all__ = ["Finding", "SEVERITIES", "diagnose_records", "diagnose_run", "format_findings", "merge_patches",
           "read_run", "write_patched_config", "spikes_of"]


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
    return sort_findings(findings)


def spikes_of(findings: list[Finding]) -> list[int]:
    """Steps of the loss spikes among findings (for plot markers)."""
    return [int(p["step"]) for f in findings if f.kind == "fluctuation" for p in f.evidence.get("spikes", [])]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def read_run(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any]]:
    """(log records, eval metrics or None, raw config dict) of a run folder; only log.jsonl is required."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError("run folder not found", file=str(run))
    metrics = _read_json(run / "eval" / "metrics.json")
    return read_log(run / "log.jsonl"), metrics if isinstance(metrics, dict) else None, _read_yaml(run / "config.yaml")


def diagnose_run(run_dir: str | Path, write_config: str | Path | None = None) -> list[Finding]:
    """Diagnose a run folder, write RUN/diagnosis.json, and optionally the patched config.

    diagnosis.json is a JSON list of findings (kind, severity, summary, explanation, fix, steps,
    evidence, config_patch) so other tools (report, a CI gate) need not re-run the analysis.
    """
    run = Path(run_dir)
    records, metrics, config = read_run(run)
    findings = diagnose_records(records, metrics, config)
    (run / "diagnosis.json").write_text(
        json.dumps([f.to_dict() for f in findings], indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        encoding="utf-8")
    if write_config is not None:
        write_patched_config(run, findings, write_config)
    return findings


def write_patched_config(run_dir: str | Path, findings: list[Finding], out: str | Path) -> dict[str, Any]:
    """RUN/config.yaml with every finding's patch applied (merged conservatively), validated and
    saved ready for `lorafit train`. Returns the merged patch."""
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise RunError("no config.yaml to patch (a run folder written by `lorafit train` has one)", file=str(cfg_path))
    patch = merge_patches(findings)
    cfg = load_config(cfg_path, overrides=patch)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    return patch
