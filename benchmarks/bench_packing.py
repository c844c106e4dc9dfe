"""Packing on real data: epoch time and final validation loss, padded HF + PEFT against lorafit's packed step.

    PYTHONPATH=src python benchmarks/bench_packing.py --model SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \
        --out benchmarks/results/packing-smollm2-bitext-h100.json
    PYTHONPATH=src python benchmarks/bench_packing.py --device cpu --examples 16 --val 8 --out /tmp/p.json  # smoke

Issue 8 asks: padding-free packing cuts epoch time at least 3x against the padded baseline at the same
final validation loss (within 1%). Every run below trains the same adapter init (a copy of the LoRA
weights taken right after `apply_lora`) on the same model object, over the same shuffled epoch, and
is scored by the same function: lorafit's `evaluate_loss` (token-mean over the whole validation set,
eval mode, no dropout) with the plain HF + PEFT modules restored.

Runs (--variants; the first is the headline)
  baseline        HF transformers + PEFT, no lorafit kernels: padded pairs (lorafit's `collate`, pad to
                  the longer), `model(**batch).loss` (token mean over the step's supervised tokens).
  budgetN[-RULE]  ours: the same epoch order packed greedily into packs of <= N tokens (`plan_packs`),
                  fused kernels, varlen attention, loss = token mean over the pack's supervised tokens.
                  Packs hold more than 2 examples, so an epoch has fewer optimizer steps; the peak LR
                  follows RULE: `steps` (default) multiplies it by baseline steps / our steps (the linear
                  scaling rule: the same sum of LRs over the epoch), `sqrt` by the square root, `none`
                  keeps it. Warmup covers the baseline's share of the epoch (--warmup-rule share).
  pairs           ours on the baseline's own pairs, packed end to end: same examples per step, same
                  steps and LR, so the same trajectory up to dropout masks and bf16 rounding.
The default headline is budget512+graph: 512-token packs keep the tokens per update close to the
baseline's (about 410 useful tokens a step against 369 for Bitext pairs; 180 steps against 200), so
the LR moves by only 1.11x and the same final loss can be expected; budget1024 (79 steps, LR x2.5 or
x1.6) is the larger-pack question that docs/speed.md left open, reported beside it.
"+graph" replays the step as one captured CUDA graph (`CudaGraphStep`): every pack is filled up to
one fixed size (N, or the epoch's longest pair, rounded up to 64) with a label-free filler example.
Packing is what makes that shape fixed without padding every row to max_length; the graph is what
turns it into speed where the eager step is bound by the host (SmolLM2 on an H100). The capture is
timed as part of the epoch. If a capture fails, the run is redone eagerly and the error is kept in
the JSON. On CPU "+graph" runs eagerly (reference kernels) and says so.

Both sides: AdamW (fused on CUDA) with the config's betas/eps/weight decay, warmup + cosine
(`lr_at`), clipping at 1.0, one LoRA dropout of 0.1. Batches are built on the host before the clock
starts; each run first does two untimed forward/backward passes without an optimizer step (CUDA and
Triton lazy initialisation), then the epoch is timed wall-clock between CUDA synchronisations.
Tokens/s counts useful tokens (no padding, no filler). Memory is torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lorafit import data as D  # noqa: E402
from lorafit.config import TrainConfig  # noqa: E402
from lorafit.kernels import (CudaGraphStep, accelerate_model, causal_lm_loss, pack_batch,  # noqa: E402
                             plan_packs, restore_model)
from lorafit.model import apply_lora, builtin_model_path, load_model, load_tokenizer, pick_device  # noqa: E402
from lorafit.training.batches import epoch_order  # noqa: E402
from lorafit.training.loop import evaluate_loss  # noqa: E402
from lorafit.training.schedule import lr_at  # noqa: E402

BITEXT = ROOT / "experiments" / "data" / "bitext"
GIB = 1024 ** 3
TARGET_RATIO, TARGET_REL_DIFF = 3.0, 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=builtin_model_path(), help="base model (.gguf, HF folder)")
    ap.add_argument("--data", default=str(BITEXT / "train.json"), help="training file (any lorafit format)")
    ap.add_argument("--val-data", default=str(BITEXT / "seen.json"),
                    help="validation file; '' holds out the first --val examples of the shuffled --data")
    ap.add_argument("--examples", type=int, default=None, help="train on the first N examples (default: all)")
    ap.add_argument("--val", type=int, default=100, help="validation examples")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-4, help="baseline peak LR")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variants", default="budget512+graph,budget512,pairs+graph,budget1024+graph,budget1024-sqrt+graph",
                    help="our runs, comma-separated, the first is the headline: budget[TOKENS][-RULE][+graph] "
                         "or pairs[+graph]")
    ap.add_argument("--pack-tokens", type=int, default=512, help="token budget of a pack (budget runs without TOKENS)")
    ap.add_argument("--lr-rule", choices=("steps", "sqrt", "none"), default="steps",
                    help="budget runs' peak LR (without -RULE): x (baseline steps / our steps), x its square root, "
                         "or unchanged")
    ap.add_argument("--warmup-rule", choices=("share", "config"), default="share",
                    help="share: warmup is the baseline's share of the epoch; config: TrainConfig's rule on our steps")
    ap.add_argument("--baseline-repeat", action="store_true",
                    help="run the baseline a second time with another dropout seed (the val-loss noise floor)")
    ap.add_argument("--time-budget", type=float, default=180.0,
                    help="seconds after which the remaining variants are skipped (recorded as skipped)")
    ap.add_argument("--out", default=None, help="JSON result file")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Data: lorafit's own encoding (chat template, response-only labels), one fixed shuffled order
# ------------------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace, cfg: TrainConfig, tok: Any) -> tuple[D.Encoded, D.Encoded, dict[str, Any]]:
    train = D.read_examples(args.data)
    if args.val_data:
        val = D.read_examples(args.val_data)
    else:  # hold out from the same file, after a seeded shuffle
        random.Random(cfg.seed).shuffle(train)
        val, train = train[: args.val], train[args.val:]
    train, val = train[: args.examples], val[: args.val]
    enc, val_enc = D.encode_all(tok, train, cfg), D.encode_all(tok, val, cfg)
    meta = {"train": args.data, "val": args.val_data or f"first {args.val} of shuffled --data",
            "train_examples": len(enc.input_ids), "val_examples": len(val_enc.input_ids),
            "train_tokens": sum(map(len, enc.input_ids)), "truncated": enc.n_truncated,
            "train_supervised_tokens": sum(sum(1 for x in lab[1:] if x != -100) for lab in enc.labels),
            "val_supervised_tokens": sum(sum(1 for x in lab[1:] if x != -100) for lab in val_enc.labels)}
    return enc, val_enc, meta


def epoch_orders(n: int, seed: int, epochs: int) -> list[list[int]]:
    """The training loop's permutation of every epoch (`lorafit.training.batches.epoch_order`)."""
    return [epoch_order(n, seed, epoch) for epoch in range(epochs)]


def pair_plan(orders: list[list[int]]) -> list[list[int]]:
    return [o[i:i + 2] for o in orders for i in range(0, len(o), 2)]


def budget_plan(orders: list[list[int]], lengths: list[int], budget: int) -> list[list[int]]:
    return [[o[j] for j in p] for o in orders for p in plan_packs([lengths[i] for i in o], budget)]


# ------------------------------------------------------------------------------------------------
# One training run over a plan of steps, and the shared evaluation
# ------------------------------------------------------------------------------------------------
def hf_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The baseline's loss: HF's own, the token mean over the batch's supervised tokens."""
    return model(**batch, use_cache=False).loss


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(model: torch.nn.Module, batches: list[dict], lrs: list[float], loss_fn: Callable, cfg: TrainConfig,
              device: torch.device, graph: bool, dropout_seed: int | None = None) -> dict[str, Any]:
    """Train one step per batch at the given LRs; the epoch's wall time and per-step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for b in batches[:2]:  # untimed: lazy CUDA/cuBLAS/Triton initialisation; no optimizer step
        loss_fn(model, _to(b, device)).backward()
    for p in params:
        p.grad = None
    torch.manual_seed(cfg.seed if dropout_seed is None else dropout_seed)  # dropout masks from the same start
    kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    step = None
    if graph:
        opt = torch.optim.AdamW(params, lr=torch.tensor(lrs[0], device=device), fused=True, capturable=True, **kw)
        step = CudaGraphStep(model, opt, _to(batches[0], device), loss_fn=loss_fn, max_grad_norm=cfg.max_grad_norm)
    else:
        opt = torch.optim.AdamW(params, lr=lrs[0], fused=True if cuda else None, **kw)
    _sync(device)
    setup_s = time.perf_counter() - t0
    losses = []
    for batch, lr in zip(batches, lrs):
        for g in opt.param_groups:
            if graph:
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        if graph:
            loss = step(batch).clone()
        else:
            loss = loss_fn(model, _to(batch, device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    _sync(device)
    epoch_s = time.perf_counter() - t0
    values = torch.stack(losses).float().cpu().tolist()
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
    del step, opt
    for p in params:
        p.grad = None
    if cuda:
        torch.cuda.empty_cache()
    k = min(10, len(values))
    return {"epoch_s": epoch_s, "setup_s": setup_s, "steps_s": epoch_s - setup_s, "peak_gib": peak,
            "train_loss_first10": sum(values[:k]) / k, "train_loss_last10": sum(values[-k:]) / k,
            "train_losses": [round(v, 4) for v in values]}


def val_loss(model: torch.nn.Module, val_enc: D.Encoded, cfg: TrainConfig, pad_id: int, device: torch.device) -> float:
    """The same evaluation for every run: plain HF + PEFT modules, eval mode, lorafit's evaluate_loss."""
    restore_model(model)
    return evaluate_loss(model, val_enc, cfg.eval_batch_size, pad_id, device)


def set_lora(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])
            p.grad = None


# ------------------------------------------------------------------------------------------------
# The runs
# ------------------------------------------------------------------------------------------------
def schedule(cfg: TrainConfig, steps: int, peak: float, warmup: int) -> list[float]:
    return [lr_at(s, peak=peak, warmup=warmup, total=steps, kind=cfg.lr_scheduler, min_ratio=cfg.min_lr_ratio)
            for s in range(steps)]


def plan_record(plan: list[list[int]], lengths: list[int], computed: int, peak: float, warmup: int) -> dict[str, Any]:
    return {"steps": len(plan), "examples_per_step": sum(map(len, plan)) / len(plan), "peak_lr": peak,
            "warmup_steps": warmup, "useful_tokens": sum(lengths[i] for p in plan for i in p),
            "computed_tokens": computed}


def run_baseline(model: Any, init: dict[str, torch.Tensor], enc: D.Encoded, plan: list[list[int]], cfg: TrainConfig,
                 pad: int, device: torch.device, dropout_seed: int | None = None) -> dict[str, Any]:
    restore_model(model)
    set_lora(model, init)
    batches = [D.collate([enc.input_ids[i] for i in p], [enc.labels[i] for i in p], pad) for p in plan]
    warmup = cfg.resolve_warmup(len(plan))
    lengths = list(map(len, enc.input_ids))
    rec = plan_record(plan, lengths, sum(b["input_ids"].numel() for b in batches), cfg.learning_rate, warmup)
    rec.update(train_run(model, batches, schedule(cfg, len(plan), cfg.learning_rate, warmup), hf_loss, cfg,
                         device, graph=False, dropout_seed=dropout_seed))
    return rec


VARIANT = re.compile(r"(?P<kind>budget|pairs)(?P<tokens>\d+)?(?:-(?P<rule>steps|sqrt|none))?(?P<graph>\+graph)?")


def parse_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """`budget[TOKENS][-RULE][+graph]` or `pairs[+graph]`; TOKENS and RULE default to the flags."""
    m = VARIANT.fullmatch(name)
    if m is None or (m["kind"] == "pairs" and (m["tokens"] or m["rule"])):
        raise SystemExit(f"unknown variant {name!r}: expected budget[TOKENS][-steps|-sqrt|-none][+graph] or pairs[+graph]")
    return {"kind": m["kind"], "tokens": int(m["tokens"] or args.pack_tokens), "rule": m["rule"] or args.lr_rule,
            "graph": bool(m["graph"])}


def ours_plan(v: dict[str, Any], args: argparse.Namespace, cfg: TrainConfig, orders: list[list[int]],
              lengths: list[int], base_steps: int) -> tuple[list[list[int]], float, int, str]:
    """(plan, peak LR, warmup steps, what differs from the baseline) for one of our runs."""
    base_warmup = cfg.resolve_warmup(base_steps)
    if v["kind"] == "pairs":
        return pair_plan(orders), cfg.learning_rate, base_warmup, "nothing in the optimisation: same pairs, steps and LR"
    plan = budget_plan(orders, lengths, v["tokens"])
    ratio = base_steps / len(plan)
    scale = {"steps": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[v["rule"]]
    if args.warmup_rule == "share":
        warmup = max(1, round(base_warmup * len(plan) / base_steps))
    else:
        warmup = cfg.resolve_warmup(len(plan))
    useful = sum(lengths[i] for p in plan for i in p)
    note = (f"packs of <= {v['tokens']} tokens: {len(plan)} optimizer steps instead of {base_steps} "
            f"({sum(map(len, plan)) / len(plan):.2f} examples, {useful / len(plan):.0f} useful tokens a step "
            f"instead of 2 examples, {useful / base_steps:.0f} tokens); peak LR x{scale:.3f} "
            f"(rule '{v['rule']}'); warmup {warmup} steps (rule '{args.warmup_rule}', baseline {base_warmup})")
    return plan, cfg.learning_rate * scale, warmup, note


def run_ours(v: dict[str, Any], model: Any, init: dict[str, torch.Tensor], enc: D.Encoded, plan: list[list[int]],
             peak: float, warmup: int, cfg: TrainConfig, pad: int, device: torch.device) -> dict[str, Any]:
    graph = v["graph"] and device.type == "cuda"
    lengths = list(map(len, enc.input_ids))
    size = None
    if graph:  # one shape for the whole epoch: the budget (or the longest pair), rounded up to 64
        longest = max(sum(lengths[i] for i in p) for p in plan)
        size = 64 * math.ceil((max(v["tokens"], longest) if v["kind"] == "budget" else longest) / 64)
    segments = max(map(len, plan)) + 1 if graph else None

    def batches() -> list[dict]:
        return [pack_batch([enc.input_ids[i] for i in p], [enc.labels[i] for i in p], pad_id=pad,
                           pad_to_tokens=size, pad_to_segments=segments) for p in plan]

    def once(use_graph: bool) -> dict[str, Any]:
        set_lora(model, init)
        accelerate_model(model)
        made = batches() if use_graph else [pack_batch([enc.input_ids[i] for i in p], [enc.labels[i] for i in p],
                                                       pad_id=pad) for p in plan]
        rec = plan_record(plan, lengths, sum(b["input_ids"].numel() for b in made), peak, warmup)
        rec["graph"] = use_graph
        rec["pack_size"] = size if use_graph else None
        rec.update(train_run(model, made, schedule(cfg, len(plan), peak, warmup), causal_lm_loss, cfg, device,
                             graph=use_graph))
        return rec

    if not graph:
        rec = once(False)
        if v["graph"]:
            rec["graph_skipped"] = f"no CUDA graph on {device.type}"
        return rec
    try:
        return once(True)
    except Exception as e:  # noqa: BLE001 - keep the run: redo it eagerly and report why
        traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        rec = once(False)
        rec["graph_error"] = f"{type(e).__name__}: {e}"
        return rec


def versions(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    variants = {name: parse_variant(name, args) for name in (v.strip() for v in args.variants.split(",")) if name}
    t_start = time.time()
    cfg = TrainConfig(model=args.model, data=[args.data], max_length=args.max_length, learning_rate=args.lr,
                      batch_size=2, num_epochs=args.epochs, seed=args.seed, device=args.device, dtype=args.dtype,
                      lora_rank=16, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear",
                      lr_scheduler="cosine", max_grad_norm=1.0).validate()
    device = pick_device(cfg.device)
    tok = D.ensure_template(load_tokenizer(cfg.model), cfg.template)
    enc, val_enc, data_meta = load_data(args, cfg, tok)
    pad = tok.pad_token_id
    res: dict[str, Any] = {"benchmark": "packing: epoch time and final validation loss (issue 8)",
                           "versions": versions(device), "device": str(device), "model": cfg.model,
                           "settings": {"lora": "r16 alpha32 dropout0.1 all-linear", "lr": cfg.learning_rate,
                                        "schedule": "warmup + cosine (lr_at)", "clip": cfg.max_grad_norm,
                                        "max_length": cfg.max_length, "epochs": args.epochs, "seed": cfg.seed,
                                        "pack_tokens": args.pack_tokens, "lr_rule": args.lr_rule,
                                        "warmup_rule": args.warmup_rule},
                           "data": data_meta, "primary": next(iter(variants), None), "runs": {}}

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))

    t_load = time.time()
    base = load_model(cfg.model, device=str(device), dtype=cfg.dtype)
    torch.manual_seed(cfg.seed)
    model = apply_lora(base, cfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    res["load_s"] = time.time() - t_load
    res["dtype"] = str(next(base.parameters()).dtype)
    res["initial_val_loss"] = val_loss(model, val_enc, cfg, pad, device)
    print(f"{data_meta['train_examples']} train / {data_meta['val_examples']} val examples on {device}; "
          f"initial val loss {res['initial_val_loss']:.4f}", flush=True)
    save()

    lengths = list(map(len, enc.input_ids))
    orders = epoch_orders(len(lengths), cfg.seed, args.epochs)
    base_plan = pair_plan(orders)

    def stage(name: str, fn: Callable[[], dict[str, Any]], what: str) -> None:
        try:
            rec = fn()
            rec["what_differs"] = what
            rec["final_val_loss"] = val_loss(model, val_enc, cfg, pad, device)
            print(f"  {name:<24} {rec['steps']:5d} steps  {rec['epoch_s']:8.2f} s/epoch  "
                  f"{rec['useful_tokens'] / rec['epoch_s']:10,.0f} useful tok/s  val {rec['final_val_loss']:.4f}"
                  + ("" if rec.get("peak_gib") is None else f"  {rec['peak_gib']:.2f} GiB"), flush=True)
        except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
            traceback.print_exc()
            rec = {"error": f"{type(e).__name__}: {e}"}
        res["runs"][name] = rec
        save()

    stage("baseline", lambda: run_baseline(model, init, enc, base_plan, cfg, pad, device),
          "the reference: HF + PEFT, padded pairs")
    for name, v in variants.items():
        if time.time() - t_start > args.time_budget:
            res["runs"][name] = {"skipped": f"time budget of {args.time_budget:.0f} s spent before this run"}
            continue
        plan, peak, warmup, note = ours_plan(v, args, cfg, orders, lengths, len(base_plan))
        stage(name, lambda: run_ours(v, model, init, enc, plan, peak, warmup, cfg, pad, device), note)

    if args.baseline_repeat:  # the noise floor: the same baseline with other dropout masks
        stage("baseline-dropout-seed2", lambda: run_baseline(model, init, enc, base_plan, cfg, pad, device,
                                                             dropout_seed=cfg.seed + 1),
              "the baseline again, with another dropout seed (noise floor of the final val loss)")
    b = res["runs"]["baseline"]
    rep = res["runs"].get("baseline-dropout-seed2", {})
    if "final_val_loss" in b and "final_val_loss" in rep:
        res["baseline_noise_val_loss_rel_diff"] = abs(rep["final_val_loss"] - b["final_val_loss"]) / b["final_val_loss"]
    res["ratios"] = {}
    for v in variants:
        o = res["runs"][v]
        if "epoch_s" in b and "epoch_s" in o:
            res["ratios"][v] = {
                "epoch_time_ratio": b["epoch_s"] / o["epoch_s"],
                "epoch_time_ratio_excl_setup": b["steps_s"] / o["steps_s"],
                "useful_tokens_per_s_ratio": (o["useful_tokens"] / o["epoch_s"]) / (b["useful_tokens"] / b["epoch_s"]),
                "val_loss_rel_diff": abs(o["final_val_loss"] - b["final_val_loss"]) / b["final_val_loss"],
                "val_loss_signed_rel_diff": (o["final_val_loss"] - b["final_val_loss"]) / b["final_val_loss"]}
    head = res["ratios"].get(res["primary"])
    if head:
        res["epoch_time_ratio"], res["val_loss_rel_diff"] = head["epoch_time_ratio"], head["val_loss_rel_diff"]
        res["targets_met"] = {"epoch_time_ratio>=3": head["epoch_time_ratio"] >= TARGET_RATIO,
                              "val_loss_rel_diff<=1%": head["val_loss_rel_diff"] <= TARGET_REL_DIFF}
    res["total_s"] = time.time() - t_start
    save()
    print("\n== summary ==", res["versions"]["device_name"])
    for v, r in res["ratios"].items():
        print(f"  {v:<24} epoch {r['epoch_time_ratio']:6.2f}x (excl. setup {r['epoch_time_ratio_excl_setup']:.2f}x)  "
              f"val loss {100 * r['val_loss_signed_rel_diff']:+.3f}%")
    print(f"  total {res['total_s']:.0f} s", flush=True)
    return res


if __name__ == "__main__":
    main()
