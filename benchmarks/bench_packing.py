"""Packing on real data: epoch time and final validation loss of `lorafit train` with padded pairs against
`packing: true`, and what the fewer optimizer steps of packed epochs cost in loss under each LR rule.

    python benchmarks/bench_packing.py --model SmolLM2-135M-Instruct.Q4_1.gguf --device cuda --out $OUT/packing.json
    python benchmarks/bench_packing.py --device cpu --examples 16 --val-data '' --val 8 --out /tmp/p.json  # smoke

Every run is `lorafit.train` itself, in this process, from the same config but for the keys each run
names: the same examples, seed (so the same LoRA initialisation and data order), LoRA r16/alpha 32/
dropout 0.1 on all linear layers, warmup + cosine, clipping at 1.0, batch 2, one epoch by default. Each
is scored by its own evaluation at the end of the run (lorafit's `evaluate_loss`: token mean over the
whole validation set, eval mode).

Runs (--variants; the first is the headline; `baseline` always runs first):
  baseline        padded pairs with `fused_kernels: false`: HF + PEFT's own forward in lorafit's loop.
  padded          padded pairs with lorafit's defaults (fused kernels; on a GPU the bucketed CUDA-graph step).
  budgetN[-RULE]  `packing: true, pack_tokens: N`: packs of whole examples of <= N tokens, so an epoch has
                  fewer optimizer steps. The peak LR follows RULE: `steps` (default) multiplies it by
                  baseline steps / packed steps (the linear scaling rule: the same sum of LRs over the epoch),
                  `sqrt` by its square root, `none` keeps it. Warmup covers the baseline's share of the epoch
                  (--warmup-rule share) or follows the config's rule on the packed steps (config).
Which micro-batch step a run took (eager, fused, CUDA graph) is the trainer's choice, recorded from its
`start` event (`step_kind`, `step_fallback`).

Epoch time: the sum, over the run's train records (logged every step), of the step's real tokens divided by
its logged tokens/s: the training steps alone, graph captures included; model loading, evaluation and saving
are not. Tokens/s counts real tokens (no padding). Memory is the run's `peak_memory_gib` (CUDA).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import re
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BITEXT = ROOT / "experiments" / "data" / "bitext"
TARGET_RATIO, TARGET_REL_DIFF = 3.0, 0.01
VARIANT = re.compile(r"(?P<kind>budget|padded)(?P<tokens>\d+)?(?:-(?P<rule>steps|sqrt|none))?")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import lorafit.model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="base model (.gguf, HF folder; default: the built-in SmolLM2)")
    ap.add_argument("--data", default=str(BITEXT / "train.json"), help="training file (any lorafit format)")
    ap.add_argument("--val-data", default=str(BITEXT / "seen.json"),
                    help="validation file; '' holds out --val examples of --data (lorafit's val_size)")
    ap.add_argument("--val", type=int, default=100, help="with --val-data '': validation examples held out")
    ap.add_argument("--examples", type=int, default=None, help="train on N examples (max_samples; default: all)")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-4, help="baseline peak LR")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variants", default="budget512,padded,budget1024,budget1024-sqrt",
                    help="runs besides the baseline, comma-separated, the first is the headline: padded or "
                         "budget[TOKENS][-steps|-sqrt|-none]")
    ap.add_argument("--pack-tokens", type=int, default=512, help="token budget of a pack (budget runs without TOKENS)")
    ap.add_argument("--lr-rule", choices=("steps", "sqrt", "none"), default="steps",
                    help="budget runs' peak LR (without -RULE): x (baseline steps / packed steps), x its square root, "
                         "or unchanged")
    ap.add_argument("--warmup-rule", choices=("share", "config"), default="share",
                    help="share: warmup is the baseline's share of the epoch; config: the config's rule on the packed steps")
    ap.add_argument("--baseline-repeat", action="store_true",
                    help="the baseline again with seed + 1 (another init, order and dropout: the val-loss noise floor)")
    ap.add_argument("--time-budget", type=float, default=1800.0,
                    help="seconds after which the remaining variants are skipped (recorded as skipped)")
    ap.add_argument("--work", default="/tmp/bench-packing", help="run folders")
    ap.add_argument("--out", default=None, help="JSON result file")
    args = ap.parse_args(argv)
    args.model = args.model or lorafit.model.builtin_model_path()
    args.parsed = {}
    for name in (v.strip() for v in args.variants.split(",")):
        m = VARIANT.fullmatch(name) if name else None
        if name and (m is None or (m["kind"] == "padded" and (m["tokens"] or m["rule"]))):
            ap.error(f"unknown variant {name!r}: expected padded or budget[TOKENS][-steps|-sqrt|-none]")
        if name:
            args.parsed[name] = {"kind": m["kind"], "tokens": int(m["tokens"] or args.pack_tokens),
                                 "rule": m["rule"] or args.lr_rule}
    return args


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {"model": args.model, "data": [args.data], "max_length": args.max_length, "learning_rate": args.lr,
           "batch_size": 2, "num_epochs": args.epochs, "max_steps": -1, "seed": args.seed, "device": args.device,
           "dtype": args.dtype, "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": "all-linear",
           "lr_scheduler": "cosine", "max_grad_norm": 1.0, "logging_steps": 1, "eval_steps": 10 ** 6,
           "save_steps": 10 ** 6}
    if args.examples:
        cfg["max_samples"] = args.examples
    if args.val_data:
        cfg["val_data"] = {"val": args.val_data}
    else:
        cfg["val_size"] = args.val
    return cfg


def step_tokens(cfg: dict[str, Any]) -> tuple[list[int], list[int], int]:
    """Per optimizer step of one epoch, as the trainer will batch it: (real tokens, computed tokens of the
    collated micro-batch, examples). lorafit's own data path and streams, so the plan is the trainer's."""
    import lorafit
    from lorafit import data as D
    from lorafit.model import load_tokenizer
    from lorafit.data.batches import PackedStream, Stream, batch_tokens

    conf = lorafit.load_config(None, cfg)
    tok = D.ensure_template(load_tokenizer(conf.model), conf.template)
    enc = D.encode_all(tok, D.build_datasets(conf).train, conf)
    stream = (PackedStream(enc, conf.batch_size, conf.pack_tokens, conf.seed, tok.pad_token_id) if conf.packing
              else Stream(enc, conf.batch_size, conf.seed, tok.pad_token_id))
    batches = [stream.batch(k) for k in range(stream.per_epoch)]
    return [batch_tokens(b) for b in batches], [b["input_ids"].numel() for b in batches], len(enc.input_ids)


def train(name: str, cfg: dict[str, Any], work: Path, tokens: list[int]) -> dict[str, Any]:
    """One `lorafit.train` run; its figures from its run folder."""
    import torch

    import lorafit

    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # a finished run there would be taken as done
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lorafit.train({**cfg, "output_dir": str(out)}, progress=False, plot=False)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    start = next(r for r in recs if r.get("event") == "start")
    end = next((r for r in recs if r.get("event") == "end"), {})
    steps = [r for r in recs if r["type"] == "train"]
    evals = [r for r in recs if r["type"] == "eval"]
    per_epoch = len(tokens)
    epoch_s = sum(tokens[(r["step"] - 1) % per_epoch] / r["tokens_per_s"] for r in steps)
    losses = [r["loss"] for r in steps]
    k = min(10, len(losses))
    return {"steps": start["total_steps"], "warmup_steps": start["effective_warmup_steps"],
            "peak_lr": start["learning_rate"], "step_kind": start.get("step_kind"),
            "step_fallback": start.get("step_fallback"), "epoch_s": epoch_s, "wall_s": wall,
            "peak_gib": end.get("peak_memory_gib"), "graphs": end.get("graphs"),
            "initial_val_loss": next((r["eval_loss"] for r in evals if r["step"] == 0), None),
            "final_val_loss": evals[-1]["eval_loss"] if evals else None,
            "train_loss_first10": sum(losses[:k]) / k, "train_loss_last10": sum(losses[-k:]) / k,
            "train_losses": [round(v, 4) for v in losses]}


def variant_config(v: dict[str, Any], args: argparse.Namespace, cfg: dict[str, Any], base_steps: int,
                   base_warmup: int) -> tuple[dict[str, Any], str]:
    """The run's config keys and what differs from the baseline."""
    if v["kind"] == "padded":
        return dict(cfg), "lorafit's defaults (fused kernels, the trainer's fastest step); same batches, steps and LR"
    packed = {**cfg, "packing": True, "pack_tokens": v["tokens"]}
    steps = max(1, int(len(step_tokens(packed)[0]) * args.epochs))  # the trainer's plan (make_plan)
    ratio = base_steps / steps
    scale = {"steps": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[v["rule"]]
    packed["learning_rate"] = args.lr * scale
    if args.warmup_rule == "share":
        packed.update(warmup_steps=max(1, round(base_warmup * steps / base_steps)), warmup_ratio=0.0)
    return packed, (f"packs of <= {v['tokens']} tokens: {steps} optimizer steps instead of {base_steps}; peak LR "
                    f"x{scale:.3f} (rule '{v['rule']}'); warmup rule '{args.warmup_rule}' (baseline {base_warmup})")


def versions() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__,
           "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.time()
    work = Path(args.work)
    cfg = base_config(args)
    base_tokens, base_computed, n_examples = step_tokens(cfg)
    import lorafit

    conf = lorafit.load_config(None, cfg)
    base_steps = max(1, int(len(base_tokens) * args.epochs))
    base_warmup = conf.resolve_warmup(base_steps)
    res: dict[str, Any] = {"benchmark": "packing in lorafit train: epoch time and final validation loss",
                           "versions": versions(), "model": args.model,
                           "settings": {"lora": "r16 alpha32 dropout0.1 all-linear", "lr": args.lr,
                                        "schedule": "warmup + cosine", "clip": 1.0, "max_length": args.max_length,
                                        "epochs": args.epochs, "seed": args.seed, "pack_tokens": args.pack_tokens,
                                        "lr_rule": args.lr_rule, "warmup_rule": args.warmup_rule},
                           "data": {"train": args.data, "val": args.val_data or f"{args.val} held out of --data",
                                    "train_examples": n_examples, "train_tokens": sum(base_tokens)},
                           "primary": next(iter(args.parsed), None), "runs": {}}

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))

    def stage(name: str, run_cfg: dict[str, Any], what: str) -> None:
        try:
            tokens, computed, _ = step_tokens(run_cfg)
            rec = {"what_differs": what, "examples_per_step": n_examples / len(tokens), "useful_tokens": sum(tokens),
                   "computed_tokens": sum(computed), **train(name, run_cfg, work, tokens)}
            print(f"  {name:<20} {rec['steps']:5d} steps  {rec['epoch_s']:8.2f} s/epoch  "
                  f"{rec['useful_tokens'] / rec['epoch_s']:10,.0f} useful tok/s  val {rec['final_val_loss']:.4f}  "
                  f"[{rec['step_kind']}]", flush=True)
        except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
            traceback.print_exc()
            rec = {"error": f"{type(e).__name__}: {e}"}
        res["runs"][name] = rec
        save()

    stage("baseline", {**cfg, "fused_kernels": False}, "the reference: HF + PEFT's forward, padded pairs")
    res["initial_val_loss"] = res["runs"]["baseline"].get("initial_val_loss")
    for name, v in args.parsed.items():
        if time.time() - t_start > args.time_budget:
            res["runs"][name] = {"skipped": f"time budget of {args.time_budget:.0f} s spent before this run"}
            continue
        run_cfg, what = variant_config(v, args, cfg, base_steps, base_warmup)
        stage(name, run_cfg, what)
    if args.baseline_repeat:
        stage("baseline-seed2", {**cfg, "fused_kernels": False, "seed": args.seed + 1},
              "the baseline again with seed + 1 (noise floor of the final val loss)")
    _ratios(res, list(args.parsed))
    res["total_s"] = time.time() - t_start
    save()
    print("\n== summary ==", res["versions"]["device_name"])
    for v, r in res["ratios"].items():
        print(f"  {v:<20} epoch {r['epoch_time_ratio']:6.2f}x  val loss {100 * r['val_loss_signed_rel_diff']:+.3f}%")
    print(f"  total {res['total_s']:.0f} s", flush=True)
    return res


def _ratios(res: dict[str, Any], variants: list[str]) -> None:
    b, runs = res["runs"]["baseline"], res["runs"]
    rep = runs.get("baseline-seed2", {})
    if "final_val_loss" in b and "final_val_loss" in rep:
        res["baseline_noise_val_loss_rel_diff"] = abs(rep["final_val_loss"] - b["final_val_loss"]) / b["final_val_loss"]
    res["ratios"] = {}
    for v in variants:
        o = runs.get(v, {})
        if "epoch_s" in b and "epoch_s" in o:
            res["ratios"][v] = {
                "epoch_time_ratio": b["epoch_s"] / o["epoch_s"],
                "useful_tokens_per_s_ratio": (o["useful_tokens"] / o["epoch_s"]) / (b["useful_tokens"] / b["epoch_s"]),
                "val_loss_rel_diff": abs(o["final_val_loss"] - b["final_val_loss"]) / b["final_val_loss"],
                "val_loss_signed_rel_diff": (o["final_val_loss"] - b["final_val_loss"]) / b["final_val_loss"]}
    head = res["ratios"].get(res["primary"])
    if head:
        res["epoch_time_ratio"], res["val_loss_rel_diff"] = head["epoch_time_ratio"], head["val_loss_rel_diff"]
        res["targets_met"] = {"epoch_time_ratio>=3": head["epoch_time_ratio"] >= TARGET_RATIO,
                              "val_loss_rel_diff<=1%": head["val_loss_rel_diff"] <= TARGET_REL_DIFF}


if __name__ == "__main__":
    main()
