"""MMLU / CMMLU before vs after for the write-up's runs: how much general knowledge each fine-tune cost.

    python experiments/benchmarks.py results/runs/bitext results/runs/bitext-mix10 results/runs/huatuo
    python experiments/benchmarks.py results/runs/bitext --device cuda --shots 0,5 --model /path/SmolLM2.gguf

Each argument is a run folder with its trained adapter (RUN/adapter/; the committed runs have none: retrain
them with experiments/run.py first). The base is loaded once per run with the adapter on top, and
`lorafit.evaluation.benchmarks.compare_benchmarks` scores base (adapter disabled) and tuned (adapter on) on
each benchmark folder, exactly as `lorafit eval RUN --benchmarks ...` does. Written:
- RUN/eval/benchmark-<name>-<k>shot.jsonl: every question's letters and log-likelihoods, base and tuned;
- RUN/eval/metrics.json gains (or replaces) its "benchmarks" entry, and metrics.md is redrawn, so
  `lorafit diagnose RUN` and `lorafit report RUN` use the accuracies;
- results/benchmarks.json: {run: benchmarks entry} for every run scored so far (docs/results.md's table).
--model replaces the config's base path (the committed configs name the GPU machine's /tmp paths).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml

from lorafit.evaluation.benchmarks import compare_benchmarks, load_benchmarks
from lorafit.evaluation.table import metrics_table_md
from lorafit.model import builtin_model_path, check_adapter, load_adapter, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GENERAL = ROOT.parent / "shared" / "data" / "general"


def score_run(run: Path, benches: list, *, model_path: str | None, device: str, dtype: str,
              batch_size: int) -> dict:
    """One run folder: base vs tuned on every benchmark; writes RUN/eval/* and returns the entry."""
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    base = model_path or cfg["model"]
    if not Path(base).exists() and builtin_model_path() and Path(base).name == Path(builtin_model_path()).name:
        base = builtin_model_path()  # the same GGUF, installed here under another path
    check_adapter(run / "adapter", "evaluate")
    tok = load_tokenizer(base)
    model = load_adapter(load_model(base, device=device, dtype=dtype), run / "adapter").eval()
    out = run / "eval"
    scored = compare_benchmarks(model, tok, benches, batch_size=batch_size, out_dir=out)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {"sets": {}}
    metrics["benchmarks"] = scored
    metrics_path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "metrics.md").write_text(metrics_table_md(metrics), encoding="utf-8")
    return scored


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders with an adapter/")
    ap.add_argument("--benchmarks", default=f"{GENERAL / 'mmlu-en'},{GENERAL / 'cmmlu-zh'}")
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--model", default=None, help="base model path (default: each run's config.yaml model)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    ap.add_argument("--dtype", default="float32", help="float32 scores as lm-eval's fp32 reference; bfloat16 is faster on GPU")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="lorafit: %(message)s")  # compare_benchmarks' per-pass times
    benches = load_benchmarks(args.benchmarks.split(","), [int(k) for k in args.shots.split(",")])  # fail fast
    out = Path(args.out)
    summary = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    for run in map(Path, args.runs):
        t0 = time.perf_counter()
        summary[run.name] = score_run(run, benches, model_path=args.model, device=args.device, dtype=args.dtype,
                                      batch_size=args.batch_size)
        for name, entry in summary[run.name].items():
            for key, block in entry.items():
                if key.endswith("-shot"):
                    o = block["overall"]
                    print(f"{run.name} {name} {key}: base {100 * o['base']:.1f}%  tuned {100 * o['tuned']:.1f}%  "
                          f"delta {100 * o['delta']:+.1f} [{100 * o['delta_ci95'][0]:+.1f}, {100 * o['delta_ci95'][1]:+.1f}]")
        print(f"{run.name}: {time.perf_counter() - t0:.0f} s on {args.device}"
              f"{' (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() and args.device != 'cpu' else ''}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
