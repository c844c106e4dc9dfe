"""The report's standard-benchmark section: MMLU/CMMLU accuracy base vs tuned from eval/metrics.json's
``benchmarks`` (lorafit eval --benchmarks), overall and per subject, with 95% intervals."""
from __future__ import annotations

from typing import Any


def benchmark_blocks(metrics: dict | None) -> list[tuple]:
    """Report blocks (render.py's Block); nothing when the run was evaluated without benchmarks."""
    bench = (metrics or {}).get("benchmarks")
    if not isinstance(bench, dict) or not bench:
        return []
    rows = []
    for name, entry in bench.items():
        for key, block in (entry.items() if isinstance(entry, dict) else ()):
            if not (key.endswith("-shot") and isinstance(block, dict)):
                continue
            parts = [("overall", block.get("overall"))] + list((block.get("subjects") or {}).items())
            for subject, o in parts:
                if isinstance(o, dict):
                    rows.append([name, key[:-5], subject, o.get("n"), _pct(o.get("base"), o.get("base_ci95")),
                                 _pct(o.get("tuned"), o.get("tuned_ci95")),
                                 _pct(o.get("delta"), o.get("delta_ci95"), signed=True),
                                 "" if o.get("p_value") is None else f"{o['p_value']:.3g}"])
    return [("h2", "Standard benchmarks (forgetting)"),
            ("p", "Multiple-choice accuracy (%) before (base) and after (with the adapter), scored as "
                  "lm-evaluation-harness's MMLU/CMMLU tasks do (log-likelihood of the answer letter). "
                  "[95% bootstrap interval over questions]; the delta's interval is paired. A drop whose "
                  "interval lies below 0 is general knowledge the fine-tune cost."),
            ("table", ["benchmark", "shots", "subject", "n", "base", "tuned", "delta (points)", "p"], rows)]


def _pct(v: Any, ci: Any, signed: bool = False) -> str:
    if not isinstance(v, (int, float)):
        return ""
    f = "{:+.1f}" if signed else "{:.1f}"
    ok = isinstance(ci, list) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci)
    return f.format(100 * v) + (f" [{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]" if ok else "")
