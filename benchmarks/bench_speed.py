"""LoRA training speed: lorafit's fused paths against HF transformers + PEFT (SDPA), in one process.

    PYTHONPATH=src python benchmarks/bench_speed.py --model llama3-8b --steps 10 --checkpointing both \
        --ablations --parity-steps 50 --packing-data .bench/bitext-tokens.json \
        --out benchmarks/results/speed-llama3-8b-h100.json

Models are the real architectures with random bf16 weights (speed does not depend on the values);
LoRA r 16, alpha 32, dropout 0.1 on q/k/v/o/gate/up/down; batch 2 x 1024 random tokens; AdamW (fused)
with gradient clipping at 1.0, identical for both sides. Both sides start from the same adapter and run
on the same weights: "baseline" is the PEFT model as built, timed through `model(**batch).loss`;
"ours" is the same model after `lorafit.kernels.accelerate_model`, timed through `causal_lm_loss`;
"+graph" replays the step as one CUDA graph (`CudaGraphStep`); ",seeded" draws LoRA dropout from a
step counter (needed for checkpointing inside a graph); "+ckpt" is HF activation checkpointing.
Eager runs go first, so that a failed capture cannot lose the reference numbers.

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 4 N (N = parameters in matrix
products: every linear layer and the output head; forward 2N plus 2N for activation gradients, no
weight gradients for frozen weights; recomputation under checkpointing is not counted) plus attention
(3 x 4 x layers x heads x head_dim x mean causal context: QK^T and PV forward, twice that backward).
Peak is the dense bf16 datasheet figure (989 TFLOP/s for H100/H200 SXM). Memory is
torch.cuda.max_memory_allocated over the run. `--make-packing-data CSV --out F` tokenizes a data set
(here, on CPU) for `--packing-data F`.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lorafit.kernels import (CudaGraphStep, accelerate_model, causal_lm_loss, pack_batch, pad_batch,  # noqa: E402
                             plan_packs, restore_model)
from lorafit.kernels.selfcheck import check_kernels  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(family="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1e6,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "smollm2-135m": dict(family="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
GIB = 1024 ** 3
# Issue 8 levers, each captured as a graph: name -> (accelerate_model flags, checkpointing, host snapshot).
# The ckpt rows all use seeded dropout (needed for checkpointing inside a graph); "ours+graph,seeded+ckpt"
# itself runs the current defaults (host snapshot, 256-row CE chunks under checkpointing).
LEVERS: dict[str, tuple[dict, bool, bool]] = {
    "lever:graph,sdpa=cudnn": ({"sdpa_backend": "cudnn"}, False, True),
    "lever:graph,sdpa=cudnn-gqa": ({"sdpa_backend": "cudnn-gqa"}, False, True),
    "lever:graph,sdpa=flash": ({"sdpa_backend": "flash"}, False, True),
    "lever:graph,fused_residual": ({"fused_residual": True}, False, True),
    "lever:graph,ce_chunk=2048": ({"ce_chunk": 2048}, False, True),
    "lever:graph,ce_chunk=512": ({"ce_chunk": 512}, False, True),
    "lever:graph,device_snapshot": ({}, False, False),
    "lever:ckpt,before(device snapshot,ce 1046 rows)": ({"seeded_dropout": True, "checkpointed_ce_chunk": None}, True, False),
    "lever:ckpt,host_snapshot,ce 1046 rows": ({"seeded_dropout": True, "checkpointed_ce_chunk": None}, True, True),
    "lever:ckpt,ce_chunk=128": ({"seeded_dropout": True, "checkpointed_ce_chunk": 128}, True, True),
}


def build(model_name: str, seed: int = 0) -> Any:
    """Random-weight model of the named shape, frozen, wrapped in the write-up's LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[model_name])
    family = shape.pop("family")
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cfg_cls(**shape, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = model_cls(cfg)
    torch.set_default_dtype(prev)
    model.requires_grad_(False)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=TARGETS,
                                            bias="none", task_type="CAUSAL_LM"))
    return peft


def flops_per_token(model: Any, ctx_mean: float) -> float:
    causal = model.get_base_model()
    n = sum(m.weight.numel() for name, m in causal.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    c = causal.config
    head_dim = c.hidden_size // c.num_attention_heads
    attn = 3 * 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * ctx_mean
    return 4 * n + attn


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_lora(model: Any, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])
            p.grad = None


def set_checkpointing(model: Any, on: bool, preserve_rng_state: bool = True) -> None:
    """HF activation checkpointing per decoder layer; preserve_rng_state=False only with seeded dropout."""
    causal = model.get_base_model()
    if on:
        causal.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": preserve_rng_state})
    else:
        causal.gradient_checkpointing_disable()
        if hasattr(causal, "disable_input_require_grads") and getattr(causal, "_require_grads_hook", None):
            causal.disable_input_require_grads()


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def time_steps(model: Any, batches: list[dict], steps: int, warmup: int, lr: float = 1e-4,
               graph: bool = False, host_snapshot: bool = True) -> dict[str, Any]:
    """Train `warmup + steps` steps; per-step wall time from CUDA events; peak memory over all.

    graph: capture the step once (`CudaGraphStep`, its warm-up steps undone) and time replays;
    host_snapshot: where CudaGraphStep keeps its pre-warm-up copy (False: on the GPU, as before).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    free()
    torch.cuda.reset_peak_memory_stats()
    if graph:
        opt = torch.optim.AdamW(params, lr=torch.tensor(lr, device="cuda"), fused=True, capturable=True)
        graphed = CudaGraphStep(model, opt, batches[0], max_grad_norm=1.0, warmup_steps=max(warmup, 2),
                                host_snapshot=host_snapshot)
        graph_memory = {k.replace("_bytes", "_gib"): v / GIB for k, v in graphed.memory.items()}
        warmup = 0
    else:
        opt = torch.optim.AdamW(params, lr=lr, fused=True)
    times, losses, timed = [], [], []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph:
            loss = graphed(batch)
        else:
            loss = causal_lm_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        end.record()
        end.synchronize()
        losses.append(loss.item())
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1000)
            timed.append(i % len(batches))
    peak = torch.cuda.max_memory_allocated() / GIB
    extra = {}
    if graph:
        extra["graph_memory_gib"] = graph_memory
        del graphed
        for p in params:
            p.grad = None
    del opt
    free()
    return {"step_s_median": statistics.median(times), "step_s_all": times, "losses": losses, "peak_gib": peak,
            "timed_batches": timed, **extra}


def random_batches(vocab: int, n: int, batch: int, length: int, seed: int, motif: int = 0) -> list[dict]:
    """Random token rows; with `motif` > 0 each row repeats a random motif (learnable, for parity)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if motif:
            ids = torch.randint(0, vocab, (batch, motif), generator=g).repeat(1, math.ceil(length / motif))[:, :length]
        else:
            ids = torch.randint(0, vocab, (batch, length), generator=g)
        out.append({"input_ids": ids.cuda(), "labels": ids.clone().cuda()})
    return out


def speed_record(name: str, run: dict, tokens: int, fpt: float, peak_flops: float | None) -> dict[str, Any]:
    tps = tokens / run["step_s_median"]
    rec = {"name": name, "tokens_per_s": tps, "step_ms": 1000 * run["step_s_median"], "peak_gib": run["peak_gib"],
           "mfu": None if peak_flops is None else tps * fpt / peak_flops,
           "step_ms_all": [round(1000 * t, 2) for t in run["step_s_all"]], "losses": run["losses"]}
    if "graph_memory_gib" in run:  # peak after the warm-up, after the capture (replays allocate nothing)
        rec["graph_memory_gib"] = run["graph_memory_gib"]
    print(f"  {name:<34} {tps:>10,.0f} tok/s  {rec['step_ms']:8.1f} ms  {run['peak_gib']:6.2f} GiB"
          + ("" if rec["mfu"] is None else f"  MFU {100 * rec['mfu']:.1f}%"), flush=True)
    return rec


def guarded(results: dict, key: str, fn: Callable[[], Any]) -> Any:
    """Run one stage; record its error instead of losing the rest of the run."""
    try:
        results[key] = fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
        traceback.print_exc()
        results[key] = {"error": f"{type(e).__name__}: {e}"}
        free()
    return results[key]


def grad_parity(model: Any, batch: dict, init: dict) -> dict[str, Any]:
    """LoRA gradients of one step, ours vs baseline, dropout off, B drawn non-zero so dA != 0.

    The noise floor beside it: the baseline again with SDPA forced off its default kernel (flash or
    math instead of cuDNN): two correct bf16 computations of the same step differ by this much.
    """
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(1)
    start = {n: (torch.randn(t.shape, generator=g, device="cuda") * 0.01 if "lora_B" in n else t) for n, t in init.items()}
    drops = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    saved_p = [m.p for m in drops]
    for m in drops:
        m.p = 0.0
    out = {}
    try:
        for side in ("baseline", "ours", "baseline_other_sdpa"):
            accelerate_model(model) if side == "ours" else restore_model(model)
            load_lora(model, start)
            model.train()
            ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]) if side.endswith("sdpa") else nullcontext()
            with ctx:
                loss = causal_lm_loss(model, batch)
                loss.backward()
            out[side] = (loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad})
    finally:
        for m, p in zip(drops, saved_p):
            m.p = p
        restore_model(model)
        load_lora(model, init)

    def errors(other: str) -> dict[str, float]:
        (lb, gb), (lo, go) = out["baseline"], out[other]
        rels = sorted(float((go[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-30)) for n in gb)
        total = torch.sqrt(sum(((go[n] - gb[n]) ** 2).sum() for n in gb) / sum((gb[n] ** 2).sum() for n in gb))
        return {"loss_rel_diff": abs(lo - lb) / abs(lb), "grad_rel_err_all": float(total),
                "grad_rel_err_median": rels[len(rels) // 2], "grad_rel_err_max": rels[-1]}

    return {"loss_baseline": out["baseline"][0], "ours_vs_baseline": errors("ours"),
            "noise_floor_other_sdpa_vs_baseline": errors("baseline_other_sdpa"), "tensors": len(out["ours"][1])}


def _curve_diff(b: list[float], o: list[float], steps: int) -> dict[str, float]:
    rel = [abs(x - y) / abs(x) for x, y in zip(b, o)]
    tail = max(1, steps // 5)
    return {"max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel),
            "mean_baseline": sum(b) / len(b), "mean_ours": sum(o) / len(o),
            "last_mean_baseline": sum(b[-tail:]) / tail, "last_mean_ours": sum(o[-tail:]) / tail,
            "last_mean_rel_diff": abs(sum(b[-tail:]) - sum(o[-tail:])) / abs(sum(b[-tail:]))}


def loss_parity(model: Any, vocab: int, steps: int, init: dict, lr: float,
                configs: dict[str, tuple[dict, bool, bool]] | None = None) -> dict[str, Any]:
    """Loss curves over `steps` steps from the same adapter on the same (learnable) batches.

    configs: name -> (accelerate_model flags, CUDA graph, checkpointing) for "our" sides; default the
    eager fused step as "ours". Each is compared with the one eager baseline curve.
    """
    configs = configs or {"ours": ({}, False, False)}
    batches = random_batches(vocab, 4, 2, 1024, seed=7, motif=32)
    restore_model(model)
    load_lora(model, init)
    torch.manual_seed(0)
    b = time_steps(model, batches, steps, 0, lr=lr)["losses"]
    out: dict[str, Any] = {"lr": lr, "steps": steps, "baseline": b}
    for name, (flags, graph, ckpt) in configs.items():
        def one(flags: dict = flags, graph: bool = graph, ckpt: bool = ckpt) -> dict[str, Any]:
            accelerate_model(model, **flags)
            set_checkpointing(model, ckpt, preserve_rng_state=not flags.get("seeded_dropout"))
            load_lora(model, init)
            torch.manual_seed(0)
            try:
                o = time_steps(model, batches, steps, 0, lr=lr, graph=graph)["losses"]
            finally:
                set_checkpointing(model, False)
            return {"flags": flags, "graph": graph, "checkpointing": ckpt, "losses": o, **_curve_diff(b, o, steps)}
        rec = guarded(out, name, one)
        if "max_rel_diff" in rec:
            print(f"  loss parity {name:<16} mean {rec['mean_baseline']:.4f} vs {rec['mean_ours']:.4f}, "
                  f"worst step {100 * rec['max_rel_diff']:.2f}%", flush=True)
    restore_model(model)
    load_lora(model, init)
    if list(configs) == ["ours"] and "losses" in out.get("ours", {}):  # the earlier flat layout
        rec = out.pop("ours")
        out.update({"ours": rec["losses"], **{k: v for k, v in rec.items() if k not in ("losses", "flags")}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpointing", nargs="?", const="on", default="off", choices=["off", "on", "both"])
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--baseline-only", action="store_true")
    side.add_argument("--ours-only", action="store_true")
    ap.add_argument("--ablations", action="store_true",
                    help="time each lever on its own (no checkpointing; CUDA graph where the step allows)")
    ap.add_argument("--parity-steps", type=int, default=0, help="loss-curve parity steps (0: skip)")
    ap.add_argument("--parity-lr", type=float, default=1e-4)
    ap.add_argument("--parity-configs", default="ours",
                    help="comma list of ours,best,best+ckpt: our sides of the loss-parity check (best: after --levers)")
    ap.add_argument("--levers", action="store_true",
                    help="time each issue-8 lever (LEVERS) as a graph, then the best combination as ours+graph,best "
                         "and ours+graph,seeded,best+ckpt")
    ap.add_argument("--best-flags", type=json.loads, default=None,
                    help='JSON accelerate_model flags for the best rows instead of the automatic choice, '
                         'e.g. \'{"sdpa_backend": "cudnn", "fused_residual": true}\'')
    ap.add_argument("--check-kernels", action="store_true", help="each kernel vs its reference on this GPU")
    ap.add_argument("--packing-data", help="JSON {input_ids, labels} of tokenized examples (--make-packing-data)")
    ap.add_argument("--make-packing-data", metavar="CSV", help="tokenize this data file to --out and exit (CPU)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.make_packing_data:
        return make_packing_data(args.make_packing_data, args.out)
    if not torch.cuda.is_available():
        sys.exit("bench_speed needs a CUDA GPU (the kernels' CPU paths are covered by tests/unit/test_kernels.py)")

    import peft
    import transformers

    dev = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in dev), None)
    results: dict[str, Any] = {
        "device": dev, "command": " ".join(sys.argv), "model_shape": args.model, "weights": "random bf16",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "triton": _triton_version(), "python": platform.python_version()},
        "settings": {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "targets": TARGETS, "batch": 2,
                     "length": 1024, "optimizer": "AdamW(fused) lr 1e-4, clip 1.0", "attn": "sdpa",
                     "peak_flops": peak, "steps": args.steps, "warmup": args.warmup},
        "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    t0 = time.time()
    model = build(args.model)
    vocab = model.get_base_model().config.vocab_size
    results["build_s"] = time.time() - t0
    print(f"{dev}: built {args.model} in {results['build_s']:.1f}s", flush=True)
    init = lora_state(model)
    batches = random_batches(vocab, 4, 2, 1024, seed=0)
    fpt = flops_per_token(model, (1024 + 1) / 2)
    results["flops_per_token"] = fpt
    if args.check_kernels:
        guarded(results, "kernel_checks", lambda: check_kernels(model))
        save()

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    # name -> (accelerate_model flags, None for the baseline; capture as a CUDA graph)
    variants = {"baseline": (None, False), "ours": ({}, False), "ours+graph": ({}, True),
                "ours+graph,seeded": ({"seeded_dropout": True}, True)}
    if args.baseline_only:
        variants = {"baseline": variants["baseline"]}
    elif args.ours_only:
        variants.pop("baseline")

    def run_variants(graphs: bool) -> None:
        for ckpt in modes:
            for variant, (flags, graph) in variants.items():
                if graph != graphs or (ckpt and variant == "ours+graph"):
                    continue  # checkpointing saves the RNG state, which cannot be read during capture
                name = variant + ("+ckpt" if ckpt else "")

                def one(flags: dict | None = flags, graph: bool = graph, name: str = name, ckpt: bool = ckpt) -> dict:
                    restore_model(model) if flags is None else accelerate_model(model, **flags)
                    set_checkpointing(model, ckpt, preserve_rng_state=not (flags or {}).get("seeded_dropout"))
                    load_lora(model, init)
                    run = time_steps(model, batches, args.steps, args.warmup, graph=graph)
                    return speed_record(name, run, 2048, fpt, peak)

                guarded(results["runs"], name, one)
                set_checkpointing(model, False)
                save()
        restore_model(model)

    run_variants(graphs=False)  # eager first: a failed capture must not cost the reference numbers
    guarded(results, "grad_parity", lambda: grad_parity(model, batches[0], init))
    save()
    parity_configs = [c for c in args.parity_configs.split(",") if c]
    unknown = set(parity_configs) - {"ours", "best", "best+ckpt"}
    if unknown:
        sys.exit(f"--parity-configs: unknown {sorted(unknown)}")
    if args.parity_steps and "ours" in parity_configs:
        guarded(results, "loss_parity", lambda: loss_parity(model, vocab, args.parity_steps, init, args.parity_lr))
        save()
    run_variants(graphs=True)

    if args.ablations:  # all captured (the eager step is CPU-bound, which would hide the GPU-side gains)
        levers = {
            "graph:lora+ce": dict(fused_norm=False, fused_rope=False, fused_swiglu=False),
            "graph:lora+ce+norm": dict(fused_rope=False, fused_swiglu=False),
            "graph:lora+ce+norm+swiglu": dict(fused_rope=False),
            "graph:all,independent_dropout": dict(shared_dropout=False),
            "graph:all_but_lora(peft)": dict(fused_lora=False),
        }
        for name, flags in levers.items():
            def one(flags: dict = flags, name: str = name) -> dict:
                accelerate_model(model, **flags)
                load_lora(model, init)
                return speed_record(name, time_steps(model, batches, max(4, args.steps // 2), 2, graph=True), 2048, fpt, peak)

            guarded(results["runs"], name, one)
            save()
        restore_model(model)

    if args.levers:
        run_levers(model, results, batches, init, args.steps, fpt, peak, save, args.best_flags)
    best = results.get("best_flags")
    wanted = {c: cfg for c, cfg in (("best", (best, True, False)), ("best+ckpt", (_ckpt_flags(best), True, True)))
              if c in parity_configs and best is not None}
    if args.parity_steps and wanted:
        guarded(results, "loss_parity_best", lambda: loss_parity(model, vocab, args.parity_steps, init, args.parity_lr,
                                                                 configs=wanted))
        save()
    _ratios(results)
    save()
    if args.packing_data:
        guarded(results, "packing", lambda: packing_benchmark(model, init, args.packing_data, args.steps))
        save()
    results["total_s"] = time.time() - t0
    save()
    _summary(results)


def _ckpt_flags(best: dict | None) -> dict:
    """The best no-checkpointing flags for a checkpointed graph: seeded dropout, and the checkpointed
    CE chunk rather than a speed-chosen ce_chunk (which would override it)."""
    flags = {k: v for k, v in (best or {}).items() if k != "ce_chunk"}
    flags["seeded_dropout"] = True
    return flags


def choose_best(runs: dict) -> dict:
    """Combine the levers that beat ours+graph in this process: the fastest pinned SDPA kernel and CE chunk
    when at least 0.3% faster, the fused residual norm when not slower (it only removes memory traffic)."""
    refs = [runs[n]["step_ms"] for n in ("ours+graph", "ours+graph(again)") if "step_ms" in runs.get(n, {})]
    if not refs:
        return {}
    ref = sum(refs) / len(refs)  # measured before the parity runs and again just before the levers

    def gain(name: str) -> float:
        return ref - runs[name]["step_ms"] if "step_ms" in runs.get(name, {}) else float("-inf")

    flags: dict[str, Any] = {}
    sdpa = max(("cudnn", "cudnn-gqa", "flash"), key=lambda b: gain(f"lever:graph,sdpa={b}"))
    if gain(f"lever:graph,sdpa={sdpa}") > 0.003 * ref:
        flags["sdpa_backend"] = sdpa
    if gain("lever:graph,fused_residual") >= 0:
        flags["fused_residual"] = True
    chunk = max((2048, 512), key=lambda c: gain(f"lever:graph,ce_chunk={c}"))
    if gain(f"lever:graph,ce_chunk={chunk}") > 0.003 * ref:
        flags["ce_chunk"] = chunk
    return flags


def run_levers(model: Any, results: dict, batches: list[dict], init: dict, steps: int, fpt: float,
               peak: float | None, save: Callable[[], None], forced: dict | None) -> None:
    """Each LEVERS row, then ours+graph again (drift check) and the best combination, with and without
    checkpointing. All captured as CUDA graphs, in the process that measured the baseline."""
    runs = results["runs"]

    def row(name: str, flags: dict, ckpt: bool, host_snapshot: bool = True) -> None:
        def one() -> dict:
            accelerate_model(model, **flags)
            set_checkpointing(model, ckpt, preserve_rng_state=not flags.get("seeded_dropout"))
            load_lora(model, init)
            try:
                run = time_steps(model, batches, steps, 2, graph=True, host_snapshot=host_snapshot)
            finally:
                set_checkpointing(model, False)
            return {"flags": flags, **speed_record(name, run, 2048, fpt, peak)}

        guarded(runs, name, one)
        save()

    row("ours+graph(again)", {}, False)
    for name, (flags, ckpt, host) in LEVERS.items():
        row(name, flags, ckpt, host)
    best = forced if forced is not None else choose_best(runs)
    results["best_flags"] = best
    print(f"  best flags: {json.dumps(best)}", flush=True)
    row("ours+graph,best", best, False)
    row("ours+graph,seeded,best+ckpt", _ckpt_flags(best), True)
    restore_model(model)


def make_packing_data(path: str, out: str, max_length: int = 1024) -> None:
    """Tokenize a data file as lorafit trains on it (SmolLM2's tokenizer and chat template)."""
    from lorafit.data import encode, ensure_template, read_examples
    from lorafit.model import builtin_model_path, load_tokenizer

    tok = ensure_template(load_tokenizer(builtin_model_path()))
    ids, labels = [], []
    for ex in read_examples(path):
        i, lab, _ = encode(tok, ex.messages, max_length=max_length)
        if any(x != -100 for x in lab):
            ids.append(i)
            labels.append(lab)
    Path(out).write_text(json.dumps({"source": str(path), "tokenizer": "SmolLM2-135M-Instruct", "max_length": max_length,
                                     "input_ids": ids, "labels": labels}))
    print(f"{len(ids)} examples, {sum(map(len, ids))} tokens -> {out}")


def packing_benchmark(model: Any, init: dict, path: str, steps: int) -> dict[str, Any]:
    """Epoch time on real examples: padded batches of 2 (baseline, and ours) against packs of <= 2048 tokens.

    One shuffled epoch is planned in full; step times are measured on its first batches (a uniform
    sample) and multiplied by the epoch's number of steps. The loss function is the same: the mean over
    the same supervised tokens, checked below in eval mode (no dropout) on the first examples.
    """
    import random

    data = json.loads(Path(path).read_text())
    ids, labels = data["input_ids"], data["labels"]
    order = random.Random(0).sample(range(len(ids)), len(ids))
    padded = [order[i:i + 2] for i in range(0, len(order), 2)]
    packs = [[order[j] for j in p] for p in plan_packs([len(ids[i]) for i in order], 2048)]

    def cuda(b: dict) -> dict:
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    def pad(idx: list[int]) -> dict:
        return cuda(pad_batch([ids[i] for i in idx], [labels[i] for i in idx]))

    def pack(idx: list[int]) -> dict:
        return cuda(pack_batch([ids[i] for i in idx], [labels[i] for i in idx]))

    res: dict[str, Any] = {"data": data.get("source"), "examples": len(ids), "tokens": sum(map(len, ids)),
                           "padded_steps_per_epoch": len(padded), "packed_steps_per_epoch": len(packs)}
    segments = max(len(p) for p in packs) + 1

    def pack_static(idx: list[int]) -> dict:  # fixed shapes for the captured step
        return cuda(pack_batch([ids[i] for i in idx], [labels[i] for i in idx], pad_to_tokens=2048,
                               pad_to_segments=segments))

    plans = {"baseline:padded": ("baseline", padded, pad, 2 * steps), "ours:padded": ("ours", padded, pad, 2 * steps),
             "baseline:packed": ("baseline", packs, pack, steps), "ours:packed": ("ours", packs, pack, steps),
             "ours:packed+graph": ("ours", packs, pack_static, steps)}
    def measure(side: str, plan: list[list[int]], make: Callable, n: int, graph: bool) -> dict[str, float]:
        restore_model(model) if side == "baseline" else accelerate_model(model)
        load_lora(model, init)
        batches = [make(b) for b in plan[:n + 2]]
        run = time_steps(model, batches, n, 2, graph=graph)
        step = sum(run["step_s_all"]) / len(run["step_s_all"])
        toks = sum(len(ids[j]) for i in run["timed_batches"] for j in plan[i])
        return {"step_ms_mean": 1000 * step, "epoch_s": step * len(plan), "tokens_per_s": toks / sum(run["step_s_all"]),
                "peak_gib": run["peak_gib"]}

    for name, (side, plan, make, n) in plans.items():
        rec = guarded(res, name, lambda: measure(side, plan, make, n, name.endswith("graph")))
        if "epoch_s" in rec:
            print(f"  packing {name:<18} {rec['epoch_s']:8.1f} s/epoch  {rec['tokens_per_s']:10,.0f} tok/s", flush=True)
    for ours in ("ours:packed", "ours:packed+graph"):
        if "epoch_s" in res.get(ours, {}) and "epoch_s" in res.get("baseline:padded", {}):
            res[f"epoch_speedup_{ours}_vs_baseline:padded"] = res["baseline:padded"]["epoch_s"] / res[ours]["epoch_s"]
    res["loss_check"] = _packed_loss_check(model, pad, pack, order[:16])
    restore_model(model)
    load_lora(model, init)
    return res


@torch.no_grad()
def _packed_loss_check(model: Any, pad: Callable, pack: Callable, idx: list[int]) -> dict[str, float]:
    """Token-mean loss of the same examples: baseline padded (pairs) vs ours packed (one pack)."""
    model.eval()
    restore_model(model)
    total = count = 0.0
    for i in range(0, len(idx), 2):
        b = pad(idx[i:i + 2])
        n = float((b["labels"][:, 1:] != -100).sum())
        total += float(causal_lm_loss(model, b)) * n
        count += n
    accelerate_model(model)
    packed = float(causal_lm_loss(model, pack(idx)))
    model.train()
    return {"baseline_padded": total / count, "ours_packed": packed}


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _ratios(results: dict) -> None:
    runs = results["runs"]
    for ckpt in ("", "+ckpt"):
        b = runs.get(f"baseline{ckpt}", {})
        for ours in ("ours", "ours+graph", "ours+graph,seeded", "ours+graph,best", "ours+graph,seeded,best"):
            o = runs.get(ours + ckpt, {})
            if "tokens_per_s" in b and "tokens_per_s" in o:
                results[f"ratio:{ours}{ckpt or '(no ckpt)'}"] = o["tokens_per_s"] / b["tokens_per_s"]


def _summary(results: dict) -> None:
    print("\n== summary ==", results["device"], results["model_shape"])
    for k, v in results.items():
        if k.startswith("ratio"):
            print(f"  {k}: {v:.2f}x")
    if "best_flags" in results:
        print(f"  best_flags: {json.dumps(results['best_flags'])}")
    for k in ("grad_parity", "loss_parity", "loss_parity_best"):
        v = results.get(k, {})
        print(f"  {k}: " + json.dumps({a: ({c: d for c, d in b.items() if not isinstance(d, list)}
                                            if isinstance(b, dict) else b)
                                       for a, b in v.items() if not isinstance(b, list)}))
    runs = results["runs"]
    print("  rows (tok/s, step ms, peak GiB):")
    for name, r in runs.items():
        if "tokens_per_s" in r:
            mem = r.get("graph_memory_gib")
            print(f"    {name:<48} {r['tokens_per_s']:>8,.0f} {r.get('step_ms', 0):7.1f} {r.get('peak_gib', 0):6.2f}"
                  + ("" if not mem else "  (warm-up peak %.2f, capture peak %.2f)"
                     % (mem["warmup_peak_gib"], mem["capture_peak_gib"])))
        elif "error" in r:
            print(f"    {name:<48} ERROR {r['error'][:100]}")


if __name__ == "__main__":
    main()
