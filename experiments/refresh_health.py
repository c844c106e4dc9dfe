"""Add generation health's ``long_references`` to a run evaluated before it existed, then re-diagnose and
re-report the run, with lorafit's own functions and no model.

``long_references`` (src/lorafit/evaluation/health.py) is the share of a set's prompts whose references'
mean answer length, in model tokens as the reference loss counts them, is at least ``max_new_tokens``.
Every predictions file (eval/predictions-{base,tuned}-<set>.jsonl) carries each prompt's ``loss_tokens``
(summed over its references) and its ``label`` (one reference or a list), so ``fits`` is recomputed
exactly as ``evaluation.run.measure`` computes it, and ``health`` is recomputed from the same file: every
other health field must equal the committed one (else the script stops and writes nothing), and only
``long_references`` is taken over. metrics.json and metrics.md are rewritten by
``evaluation.run.write_metrics`` (as ``lorafit eval`` writes them); then ``lorafit.diagnose`` (diagnosis.json)
and ``lorafit.report`` (report.md, report.html, loss.png) run as experiments/run.py ran them, and
summary.json (experiments/run.py's: ``metrics_llamafactory``'s health and ``diagnosis``) and the experiment file
that merged it (results/rerun/<experiment>.json) are updated to match.

    python experiments/refresh_health.py results/rerun/runs/bitext [RUN ...] [--max-new-tokens 128]

``--max-new-tokens`` defaults to the run's config.yaml (the reruns' evaluation passed --max-new-tokens 128,
experiments/device.sh, and their config.yaml records 128).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

import lorafit
from lorafit.evaluation.health import health
from lorafit.evaluation.run import write_metrics

SIDES = {"before": "base", "after": "tuned"}


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _question(prompt: str) -> str:
    """The user's text of a ChatML-rendered prompt (health reads the prompt's language from it)."""
    if "<|im_start|>user\n" in prompt:
        return prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    return prompt


def fits(rows: list[dict[str, Any]], max_new_tokens: int) -> list[bool]:
    """evaluation.run.measure's ``fits``: the prompt's references' mean answer tokens < max_new_tokens."""
    count = [int(r["loss_tokens"]) for r in rows]
    refs = [1 if isinstance(r["label"], str) else len(r["label"]) for r in rows]
    return [c / max(n, 1) < max_new_tokens for c, n in zip(count, refs)]


def refreshed_health(run: Path, name: str, side: str, old: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    rows = _read(run / "eval" / f"predictions-{SIDES[side]}-{name}.jsonl")
    if any("loss_tokens" not in r or "no_eos" not in r for r in rows):
        raise SystemExit(f"{run}: predictions-{SIDES[side]}-{name}.jsonl lacks loss_tokens/no_eos per prompt")
    new = health([_question(r["prompt"]) for r in rows], [r["predict"] for r in rows], [r["label"] for r in rows],
                 [bool(r["no_eos"]) for r in rows], fits(rows, max_new_tokens))
    for k, v in old.items():   # the predictions must reproduce every committed field
        if new.get(k) != v:
            raise SystemExit(f"{run}: set {name!r} {side}: recomputed {k} {new.get(k)!r} != committed {v!r}")
    out: dict[str, Any] = {}
    for k, v in old.items():   # health()'s key order: long_references comes before length_ratio
        if k == "length_ratio":
            out["long_references"] = new["long_references"]
        out[k] = v
    out.setdefault("long_references", new["long_references"])
    return out


def refresh(run: Path, max_new_tokens: int | None) -> None:
    mnt = max_new_tokens or int(yaml.safe_load((run / "config.yaml").read_text())["max_new_tokens"])
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    for name, s in metrics["sets"].items():
        for side in SIDES:
            s["health"][side] = refreshed_health(run, name, side, s["health"][side], mnt)
        print(f"{run.name} {name}: no_eos {s['health']['before']['no_eos']:.2f} -> {s['health']['after']['no_eos']:.2f}, "
              f"long_references {s['health']['after']['long_references']:.2f} (max_new_tokens {mnt})")
    write_metrics(run / "eval", metrics)
    findings = lorafit.diagnose(run)          # diagnosis.json
    lorafit.report(run)                       # report.html, report.md, loss.png
    print(f"{run.name}: " + "; ".join(f"{f.severity} {f.kind}" for f in findings))
    summary_path = run / "summary.json"       # experiments/run.py's, when the run came from it
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        for name, entry in ((summary.get("metrics_llamafactory") or {}).get("sets") or {}).items():
            entry["health"] = metrics["sets"][name]["health"]   # only health: the run's later keys stay out
        summary["diagnosis"] = [{"kind": f.kind, "severity": f.severity, "steps": f.steps} for f in findings]
        summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        for merged in sorted(run.parent.parent.glob("*.json")):   # run.py's merge(): results/<experiment>.json
            done = json.loads(merged.read_text())
            if isinstance(done, dict) and isinstance(done.get(run.name), dict) and "diagnosis" in done[run.name]:
                done[run.name] = summary
                merged.write_text(json.dumps(done, indent=1, ensure_ascii=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    a = ap.parse_args()
    for run in a.runs:
        refresh(run, a.max_new_tokens)


if __name__ == "__main__":
    main()
