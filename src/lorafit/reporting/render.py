"""report.html and report.md: everything about a run on one page.

Both files are rendered from the same list of blocks, so they can never disagree. The HTML is
self-contained (inline CSS, plots as base64 PNG, no scripts, fonts or links to fetch), so it can be
mailed or archived as one file; the Markdown refers to loss.png beside it.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Union

from ..diagnosis import Finding, diagnose_records, read_run
from ..diagnosis.findings import SEVERITIES, format_patch, format_steps, sort_findings
from ..diagnosis.records import RunSeries, build_series
from ..errors import RunError
from ..rundir import REPORT_HTML, REPORT_MD
from .benchmarks import benchmark_blocks
from .evaluation import checkpoint_blocks, flips_blocks, health_blocks, metrics_blocks
from .plots import plot_loss

Block = tuple  # ("h2", text) | ("p", text) | ("table", headers, rows) | ("img", png, alt, md_path) | ("finding", f) | ("pre", text)
Study = Union[dict, str, Path, list, tuple, None]

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return str(v) if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return "" if v is None else str(v)


# --- content ------------------------------------------------------------------------------------
def _summary(s: RunSeries, findings: list[Finding], metrics: dict | None) -> list[Block]:
    rows: list[list[Any]] = [["steps logged", int(s.last_step)]]
    if s.epoch is not None and len(s.epoch):
        rows.append(["epochs", round(float(s.epoch[-1]), 2)])
    if len(s.loss) >= 2:
        k = max(1, min(5, len(s.loss) // 5))
        a, b = float(sorted(s.loss[:k])[k // 2]), float(sorted(s.loss[-k:])[k // 2])
        rows.append(["train loss (first → last)", f"{a:.4g} → {b:.4g} ({100 * (b / a - 1):+.1f}%)"])
    for split, (st, y) in s.evals.items():
        i = min(range(len(y)), key=lambda j: y[j])
        rows.append([f"eval loss '{split}' (first → best → last)",
                     f"{y[0]:.4g} → {y[i]:.4g} (step {int(st[i])}) → {y[-1]:.4g}"])
    counts = {sev: sum(f.severity == sev for f in findings) for sev in SEVERITIES}
    rows.append(["findings", ", ".join(f"{n} {sev}" for sev, n in reversed(counts.items()) if n) or "none"])
    return [("h2", "Summary"), ("p", _verdict(s, findings, metrics)), ("table", ["what", "value"], rows)]


def _verdict(s: RunSeries, findings: list[Finding], metrics: dict | None) -> str:
    """One sentence: did the fine-tune work, and on what evidence."""
    critical = [f for f in findings if f.severity == "critical"]
    if critical:
        return "Verdict: do not use this adapter as is — " + "; ".join(f.summary for f in critical) + "."
    evidence = []
    sets = (metrics or {}).get("sets") or {}
    deltas = [v.get("delta", {}).get("rouge-l") for k, v in sets.items() if k != "general" and isinstance(v, dict)]
    deltas = [d for d in deltas if isinstance(d, (int, float))]
    if deltas:
        evidence.append(f"ROUGE-L changed by {sum(deltas) / len(deltas):+.3g} on the in-domain test set(s)")
    for split in s.validation_splits():
        y = s.evals[split][1]
        if len(y) >= 2:
            evidence.append(f"'{split}' loss {100 * (min(y) / y[0] - 1):+.1f}% from its first evaluation")
    if deltas:   # generation metrics are the stronger evidence when present
        improved = sum(deltas) > 0
    else:
        improved = any(len(s.evals[k][1]) >= 2 and min(s.evals[k][1]) < 0.98 * s.evals[k][1][0]
                       for k in s.validation_splits())
    warnings = [f for f in findings if f.severity == "warning"]
    if not evidence:
        head = "Verdict: training ran; without validation loss or eval metrics there is no evidence yet that it generalises"
    elif improved:
        head = "Verdict: the fine-tune worked" + (", with problems to fix" if warnings else "")
    else:
        head = "Verdict: no measurable improvement"
    return head + (" (" + "; ".join(evidence) + ")." if evidence else ".")


def _findings(findings: list[Finding]) -> list[Block]:
    out: list[Block] = [("h2", "Diagnosis")]
    if not findings:
        return out + [("p", "No problems found: training and validation curves look healthy.")]
    return out + [("finding", f) for f in sort_findings(findings)]


def _load_study(study: Study) -> tuple[dict | None, list[bytes]]:
    items = list(study) if isinstance(study, (list, tuple)) else [study]
    data, pngs = None, []
    for it in items:
        if it is None:
            continue
        if isinstance(it, dict):
            data = it
            continue
        p = Path(it)
        if not p.is_file():
            raise RunError("blind-study file not found", file=str(p))
        if p.suffix.lower() == ".png":
            pngs.append(p.read_bytes())
        else:
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except ValueError as e:
                raise RunError(f"blind-study results are not JSON ({e})", file=str(p)) from None
    return data if isinstance(data, dict) else None, pngs


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _flat(d: dict, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """{"a": {"mean": 3.1, "ci95": [2.9, 3.3]}} -> {"a.mean": 3.1, "a.ci95": "[2.9, 3.3]"} (two levels)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if _is_scalar(v):
            out[key] = v
        elif isinstance(v, dict) and depth < 1:
            out.update(_flat(v, key + ".", depth + 1))
        elif isinstance(v, list) and all(_is_scalar(x) for x in v) and len(v) <= 4:
            out[key] = "[" + ", ".join(_fmt(x) for x in v) + "]"
        else:
            out[key] = json.dumps(v, ensure_ascii=False)[:80]
    return out


def _records_table(rows: list[tuple[str | None, dict]]) -> tuple[list[str], list[list[Any]]]:
    flat = [(name, _flat(r)) for name, r in rows]
    cols = list(dict.fromkeys(c for _, r in flat for c in r))
    head = ([] if rows[0][0] is None else ["name"]) + cols
    return head, [([] if name is None else [name]) + [r.get(c) for c in cols] for name, r in flat]


def study_tables(study: dict) -> list[tuple[str, list[str], list[list[Any]]]]:
    """Tables for any blind-study JSON: its top-level scalars, then one table per entry: a mapping of
    records (e.g. per-model or per-dimension means) or a list of records as rows, any other mapping as
    key/value pairs. Nested values are flattened to dotted columns (a.mean, a.ci95)."""
    tables = []
    scalars = [[k, v] for k, v in study.items() if _is_scalar(v)]
    if scalars:
        tables.append(("summary", ["key", "value"], scalars))
    for k, v in study.items():
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            tables.append((k, *_records_table(list(v.items()))))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, *_records_table([(None, x) for x in v[:100]])))
        elif isinstance(v, dict) and v:
            tables.append((k, ["key", "value"], [[a, b] for a, b in _flat(v).items()]))
    return tables


def _study(study: Study) -> list[Block]:
    data, pngs = _load_study(study)
    if data is None and not pngs:
        return []
    out: list[Block] = [("h2", "Blind test")]
    for title, headers, rows in study_tables(data or {}):
        out += [("p", title), ("table", headers, rows)]
    out += [("img", png, "blind-study results", None) for png in pngs]
    return out


def _config(config: dict) -> list[Block]:
    if not config:
        return [("h2", "Configuration"), ("p", "No config.yaml in this run folder.")]
    return [("h2", "Configuration"), ("table", ["key", "value"], [[k, v] for k, v in config.items()])]


# --- rendering ----------------------------------------------------------------------------------
def _md_cell(v: Any) -> str:
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if b[0] == "h2":
            out += [f"## {b[1]}", ""]
        elif b[0] == "p":
            out += [b[1], ""]
        elif b[0] == "pre":
            out += [b[1].rstrip(), ""]
        elif b[0] == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b[1]) + " |")
            out.append("|" + "---|" * len(b[1]))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b[2]]
            out.append("")
        elif b[0] == "img" and b[3]:
            out += [f"![{b[2]}]({b[3]})", ""]
        elif b[0] == "finding":
            f = b[1]
            where = format_steps(f.steps)
            out.append(f"### [{f.severity.upper()}] {f.kind}: {f.summary}" + (f" ({where})" if where else ""))
            out += ["", f"- **Why:** {f.explanation}", f"- **Fix:** {f.fix}"]
            if f.config_patch:
                out.append(f"- **Config patch:** `{format_patch(f.config_patch)}`")
            ev = {k: v for k, v in f.to_dict()["evidence"].items() if not isinstance(v, (list, dict))}
            if ev:
                out.append("- **Evidence:** " + ", ".join(f"{k}={_fmt(v)}" for k, v in ev.items()))
            out.append("")
    return "\n".join(out).rstrip() + "\n"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}
img{max-width:100%}.f{border-left:5px solid #999;padding:.4em .9em;margin:.8em 0;background:#fafafa}
.critical{border-color:#c62828}.warning{border-color:#ef8f00}.info{border-color:#1e88e5}
.sev{font-weight:bold;text-transform:uppercase;font-size:.8em}pre{background:#f6f6f6;padding:.6em;overflow:auto}
code{background:#f1f1f1;padding:0 .2em}"""


def _h(v: Any) -> str:
    return html.escape(_fmt(v))


def to_html(title: str, blocks: list[Block]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if b[0] == "h2":
            out.append(f"<h2>{html.escape(b[1])}</h2>")
        elif b[0] == "p":
            out.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "pre":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
        elif b[0] == "table":
            head = "".join(f"<th>{_h(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in r) + "</tr>" for r in b[2])
            out.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif b[0] == "img":
            data = base64.b64encode(b[1]).decode("ascii")
            out.append(f'<p><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}"></p>')
        elif b[0] == "finding":
            f = b[1]
            where = format_steps(f.steps)
            out.append(f'<div class="f {f.severity}"><span class="sev">{f.severity}</span> '
                       f"<b>{html.escape(f.kind)}</b>: {html.escape(f.summary)}"
                       + (f" <i>({html.escape(where)})</i>" if where else "")
                       + f"<p><b>Why:</b> {html.escape(f.explanation)}</p><p><b>Fix:</b> {html.escape(f.fix)}</p>"
                       + (f"<p><b>Config patch:</b> <code>{html.escape(format_patch(f.config_patch))}</code></p>"
                          if f.config_patch else "")
                       + "<details><summary>Evidence</summary><pre>"
                       + html.escape(json.dumps(f.to_dict()["evidence"], indent=1, ensure_ascii=False))
                       + "</pre></details></div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(run_dir: str | Path, study: Study = None) -> tuple[Path, Path]:
    """Write RUN/report.html (self-contained) and RUN/report.md (plus a fresh RUN/loss.png).

    `study`: blind-study results as a dict, a path to their JSON, a path to a PNG, or a list of these.
    """
    run = Path(run_dir)
    records, metrics, config = read_run(run)
    findings = diagnose_records(records, metrics, config)
    s = build_series(records, config)
    png = plot_loss(run, findings)
    title = f"lorafit report: {run.resolve().name}"
    blocks = (_summary(s, findings, metrics) + _findings(findings)
              + [("h2", "Training curves"), ("img", png.read_bytes(), "loss curves", png.name)]
              + metrics_blocks(run, metrics) + benchmark_blocks(metrics) + health_blocks(metrics)
              + flips_blocks(metrics)
              + checkpoint_blocks(run) + _study(study) + _config(config))
    html_path, md_path = run / REPORT_HTML, run / REPORT_MD
    html_path.write_text(to_html(title, blocks), encoding="utf-8")
    md_path.write_text(to_markdown(title, blocks), encoding="utf-8")
    return html_path, md_path
