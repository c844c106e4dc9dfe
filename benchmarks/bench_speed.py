"""LoRA training speed at full 2 x 1024-token steps: `lorafit train`'s own step against HF transformers + PEFT,
in one process.

    python benchmarks/bench_speed.py --model llama3-8b --steps 10 --checkpointing both --out $OUT/speed-llama3-8b.json

The model is a random-weight bf16 folder of the named real shape (`shapes.build_model_folder`; speed does
not depend on the values) and the data synthetic examples longer than `--length`, so every micro-batch is
2 x 1024 tokens with no padding. LoRA r 16, alpha 32, dropout 0.1 on all linear layers; AdamW (fused on
CUDA), clipping at 1.0, a constant LR of 1e-4 (no warmup), the same micro-batches in the same order on
every row.

Rows (`--rows`; `--checkpointing on` adds each with activation checkpointing, `+ckpt`):
  baseline       HF + PEFT in this process: `model(**batch).loss`, backward, clipping, fused AdamW, over
                 lorafit's own micro-batches (`lorafit.data.batches.Stream`). Runs first, so a failure
                 of a lorafit row cannot cost the reference numbers.
  lorafit-eager  `lorafit.train` in this process with `fused_kernels: false` (HF + PEFT's forward in
                 lorafit's loop).
  lorafit-fused  `lorafit.train` with `fused_kernels: true, cuda_graph: false` (the eager fused step).
  lorafit        `lorafit.train` with its defaults (fused kernels and, where the step allows, the bucketed
                 CUDA-graph step): what a user's `lorafit train` runs.
  lorafit-fp8    the same with `quantize_base: fp8` (frozen GEMMs in FP8: a different computation; its
                 losses are compared with the baseline's like every row's). Only when named in --rows.
A lorafit row's figures are the run's own: tokens/s from the train records of its `log.jsonl` (logged
every step), peak memory from its `end` event, the step it took from its `start` event (`step_kind`,
`step_fallback`). The first `--warmup` steps (CUDA warm-up, graph captures) are not counted; a row's
tokens/s is the median of the others. The baseline is timed the same way: wall time per step between
CUDA synchronisations, batch transfer included.

MFU = tokens/s x FLOPs per token / peak (`shapes.flops_per_token`; 989 TFLOP/s dense bf16 for H100/H200
SXM). Memory is `torch.cuda.max_memory_allocated`, reset before each row. `--device cpu` runs every code
path on a CPU (tests, with a tiny `--model-dir`); its timings mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Callable

from shapes import PEAK_BF16, SHAPES, build_model_folder, flops_per_token, write_long_examples

# Row name -> lorafit config keys (None: the HF + PEFT baseline in this process).
ROWS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "lorafit-eager": {"fused_kernels": False},
    "lorafit-fused": {"fused_kernels": True, "cuda_graph": False},
    "lorafit": {},
    "lorafit-fp8": {"quantize_base": "fp8", "fused_kernels": True},  # true: auto's choice on a GPU, and runs on CPU
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b", help="the shape of the random-weight model")
    ap.add_argument("--model-dir", default=None,
                    help="model folder: used as it is when it holds a model, else built there (default /tmp/bench-speed/MODEL)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps per row")
    ap.add_argument("--length", type=int, default=1024, help="tokens per row of a micro-batch (max_length)")
    ap.add_argument("--batch", type=int, default=2, help="rows per micro-batch (batch_size)")
    ap.add_argument("--checkpointing", nargs="?", const="on", default="off", choices=["off", "on", "both"])
    ap.add_argument("--rows", default=",".join(r for r in ROWS if r != "lorafit-fp8"),
                    help=f"comma list of {', '.join(ROWS)} (default: all but lorafit-fp8)")
    ap.add_argument("--check-kernels", action="store_true", help="each kernel vs its reference on this GPU, at the model's sizes")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--work", default="/tmp/bench-speed", help="data and run folders")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:  # checked before anything is built: a typo must not cost a GPU minute
        ap.error(f"--rows: unknown {unknown}; known: {list(ROWS)}")
    args.rows = rows
    return args


def run_config(args: argparse.Namespace, model_dir: Path, data: Path) -> dict[str, Any]:
    """The lorafit config every row shares (the baseline reads its data, order and LoRA from it too)."""
    return {"model": str(model_dir), "data": [str(data)], "max_length": args.length, "batch_size": args.batch,
            "max_steps": args.warmup + args.steps, "learning_rate": 1e-4, "lr_scheduler": "constant",
            "warmup_steps": 0, "warmup_ratio": 0.0, "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.1,
            "target_modules": "all-linear", "max_grad_norm": 1.0, "logging_steps": 1, "eval_steps": 10 ** 6,
            "save_steps": 10 ** 6, "seed": 0, "device": args.device}


def free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def baseline_row(cfg: dict[str, Any], ckpt: bool, check_kernels: bool) -> dict[str, Any]:
    """HF + PEFT, timed step by step over lorafit's micro-batches; the kernel checks on its model if asked."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import lorafit
    from lorafit import data as D
    from lorafit.model import load_tokenizer, lora_config
    from lorafit.data.batches import Stream, batch_tokens

    conf = lorafit.load_config(None, cfg)
    device = conf.device
    tok = D.ensure_template(load_tokenizer(conf.model), conf.template)
    stream = Stream(D.encode_all(tok, D.build_datasets(conf).train, conf), conf.batch_size, conf.seed, tok.pad_token_id)
    torch.manual_seed(conf.seed)
    base = AutoModelForCausalLM.from_pretrained(conf.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                                attn_implementation="sdpa").to(device)
    if ckpt:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, lora_config(conf))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=conf.learning_rate, betas=(conf.adam_beta1, conf.adam_beta2), eps=conf.adam_eps,
                            weight_decay=conf.weight_decay, fused=True if device == "cuda" else None)
    model.train()
    free(device)
    times, losses, tokens = [], [], []
    for k in range(conf.max_steps):
        sync(device)
        t0 = time.perf_counter()
        batch = {key: v.to(device, non_blocking=True) for key, v in stream.batch(k).items()}
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, conf.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        tokens.append(batch_tokens(batch))
    rec = {"losses": losses, "step_s_all": times, "tokens_all": tokens,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None}
    if check_kernels:
        from lorafit.kernels.selfcheck import check_kernels as run_checks

        guarded(rec, "kernel_checks", partial(run_checks, model))
    del model, base, opt, params
    free(device)
    return rec


def lorafit_row(cfg: dict[str, Any]) -> dict[str, Any]:
    """`lorafit.train` in this process; the row's figures from its run folder."""
    import lorafit

    out = Path(cfg["output_dir"])
    shutil.rmtree(out, ignore_errors=True)  # a finished run there would be taken as done
    free(cfg["device"])
    t0 = time.perf_counter()
    lorafit.train(cfg, progress=False, plot=False)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    start = next(r for r in recs if r.get("event") == "start")
    end = next((r for r in recs if r.get("event") == "end"), {})
    train = [r for r in recs if r["type"] == "train"]
    return {"losses": [r["loss"] for r in train], "tokens_per_s_all": [r["tokens_per_s"] for r in train],
            "peak_gib": end.get("peak_memory_gib"), "step_kind": start.get("step_kind"),
            "step_fallback": start.get("step_fallback"), "graphs": end.get("graphs"), "wall_s": round(wall, 1),
            "run": str(out)}


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def speed_record(name: str, rec: dict[str, Any], warmup: int, tokens_per_step: int, fpt: float,
                 peak: float | None) -> dict[str, Any]:
    """tokens/s (median over the steps after the warm-up), step ms, MFU, and the raw series."""
    if "step_s_all" in rec:  # the baseline: its own step times
        rates = [t / s for t, s in zip(rec["tokens_all"], rec["step_s_all"])]
    else:
        rates = rec["tokens_per_s_all"]
    tps = statistics.median(rates[warmup:] or rates)
    out = {"name": name, "tokens_per_s": tps, "step_ms": 1000 * tokens_per_step / tps, "peak_gib": rec["peak_gib"],
           "mfu": None if peak is None else tps * fpt / peak,
           "step_ms_all": [round(1000 * tokens_per_step / r, 2) for r in rates],
           **{k: v for k, v in rec.items() if k not in ("step_s_all", "tokens_all", "tokens_per_s_all", "peak_gib")}}
    mem = "" if rec["peak_gib"] is None else f"  {rec['peak_gib']:6.2f} GiB"
    print(f"  {name:<22} {tps:>10,.0f} tok/s  {out['step_ms']:8.1f} ms{mem}"
          + ("" if out["mfu"] is None else f"  MFU {100 * out['mfu']:.1f}%")
          + (f"  [{rec['step_kind']}]" if rec.get("step_kind") else ""), flush=True)
    return out


def guarded(results: dict, key: str, fn: Callable[[], Any]) -> Any:
    """Run one stage; record its error instead of losing the rest of the run."""
    try:
        results[key] = fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
        traceback.print_exc()
        results[key] = {"error": f"{type(e).__name__}: {e}"}
    return results[key]


def versions() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "triton": tv, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_speed: no CUDA GPU here (--device cpu runs the code paths)")
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()})"
    peak = next((v for k, v in PEAK_BF16.items() if k in dev), None)
    work = Path(args.work)
    t0 = time.time()
    model_dir = build_model_folder(args.model, Path(args.model_dir or work / args.model), device=args.device)
    data = write_long_examples(work / f"long-{args.length}.json", 64, args.length)
    cfg = run_config(args, model_dir, data)
    tokens_per_step = args.batch * args.length
    fpt = flops_per_token(model_dir, (args.length + 1) / 2)
    results: dict[str, Any] = {
        "device": dev, "command": " ".join(sys.argv if argv is None else ["bench_speed.py", *argv]),
        "model_shape": args.model, "model_dir": str(model_dir), "weights": "random bf16", "versions": versions(),
        "settings": {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "targets": "all-linear",
                     "batch": args.batch, "length": args.length, "optimizer": "AdamW (fused on CUDA), lr 1e-4 constant, clip 1.0",
                     "attn": "sdpa", "peak_flops": peak, "steps": args.steps, "warmup": args.warmup,
                     "step": "lorafit rows: lorafit.train (the trainer's own step); baseline: HF + PEFT"},
        "build_s": time.time() - t0, "flops_per_token": fpt, "runs": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    print(f"{dev}: {args.model} at {model_dir} ({results['build_s']:.1f}s)", flush=True)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    for ckpt in modes:
        for name in args.rows:
            key = name + ("+ckpt" if ckpt else "")
            flags = ROWS[name]
            if flags is None:
                def one(ckpt: bool = ckpt, key: str = key) -> dict:
                    rec = baseline_row(cfg, ckpt, args.check_kernels and not ckpt)
                    if "kernel_checks" in rec:
                        results["kernel_checks"] = rec.pop("kernel_checks")
                    return speed_record(key, rec, args.warmup, tokens_per_step, fpt, peak)
            else:
                row_cfg = {**cfg, **flags, "gradient_checkpointing": ckpt, "output_dir": str(work / "runs" / key)}

                def one(row_cfg: dict = row_cfg, key: str = key) -> dict:
                    return speed_record(key, lorafit_row(row_cfg), args.warmup, tokens_per_step, fpt, peak)

            guarded(results["runs"], key, one)
            save()
    _compare(results)
    results["total_s"] = time.time() - t0
    save()
    _summary(results)
    return results


def _compare(results: dict) -> None:
    """Each row against the baseline of its checkpointing mode: tokens/s ratio and per-step loss difference."""
    runs = results["runs"]
    for key, r in runs.items():
        ckpt = "+ckpt" if key.endswith("+ckpt") else ""
        b = runs.get("baseline" + ckpt, {})
        if key.startswith("baseline") or "tokens_per_s" not in r or "tokens_per_s" not in b:
            continue
        results[f"ratio:{key.removesuffix('+ckpt')}{ckpt or '(no ckpt)'}"] = r["tokens_per_s"] / b["tokens_per_s"]
        rel = [abs(x - y) / abs(y) for x, y in zip(r["losses"], b["losses"])]
        if rel:  # dropout masks differ between the sides: agreement in distribution, not bit for bit
            r["loss_vs_baseline"] = {"max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel),
                                     "mean_loss": sum(r["losses"]) / len(r["losses"]),
                                     "mean_loss_baseline": sum(b["losses"]) / len(b["losses"])}


def _summary(results: dict) -> None:
    print("\n== summary ==", results["device"], results["model_shape"])
    for k, v in results.items():
        if k.startswith("ratio"):
            print(f"  {k}: {v:.2f}x")
    for name, r in results["runs"].items():
        if "error" in r:
            print(f"  {name:<22} ERROR {r['error'][:200]}")
        elif "loss_vs_baseline" in r:
            print(f"  {name:<22} losses vs baseline: worst step {100 * r['loss_vs_baseline']['max_rel_diff']:.2f}%")


if __name__ == "__main__":
    main()
