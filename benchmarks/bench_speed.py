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
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lorafit.kernels import accelerate_model, restore_model  # noqa: E402
from lorafit.kernels.selfcheck import check_kernels  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from speed_common import (PEAK_BF16, SHAPES, TARGETS, build, flops_per_token, guarded,  # noqa: E402
                          load_lora, lora_state, random_batches, set_checkpointing, speed_record, time_steps)
from speed_packing import make_packing_data, packing_benchmark  # noqa: E402
from speed_parity import grad_parity, loss_parity  # noqa: E402

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


# The timed rows: name -> (accelerate_model flags, None for the baseline; capture as a CUDA graph).
VARIANTS: dict[str, tuple[dict | None, bool]] = {
    "baseline": (None, False), "ours": ({}, False), "ours+graph": ({}, True),
    "ours+graph,seeded": ({"seeded_dropout": True}, True)}
PARITY_CONFIGS = ("ours", "best", "best+ckpt", "seeded", "seeded+ckpt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpointing", nargs="?", const="on", default="off", choices=["off", "on", "both"])
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--baseline-only", action="store_true")
    side.add_argument("--ours-only", action="store_true")
    ap.add_argument("--rows", default=None,
                    help="comma list of the rows to time (baseline,ours,ours+graph,ours+graph,seeded; default all); "
                         "a row in a process of its own gives a memory peak no earlier row can inflate")
    ap.add_argument("--ablations", action="store_true",
                    help="time each lever on its own (no checkpointing; CUDA graph where the step allows)")
    ap.add_argument("--parity-steps", type=int, default=0, help="loss-curve parity steps (0: skip)")
    ap.add_argument("--parity-lr", type=float, default=1e-4)
    ap.add_argument("--parity-configs", default="ours",
                    help="comma list of ours,best,best+ckpt,seeded,seeded+ckpt: our sides of the loss-parity check "
                         "(best: after --levers; seeded: the graph step with seeded dropout)")
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
    # Arguments are checked before the model is built: a typo must not cost a GPU minute.
    try:
        wanted_rows = _split_rows(args.rows, VARIANTS) if args.rows else list(VARIANTS)
    except ValueError as e:
        ap.error(str(e))
    parity_configs = [c for c in args.parity_configs.split(",") if c]
    unknown = set(parity_configs) - set(PARITY_CONFIGS)
    if unknown:
        ap.error(f"--parity-configs: unknown {sorted(unknown)}; known: {list(PARITY_CONFIGS)}")
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
    variants = {k: v for k, v in VARIANTS.items() if k in wanted_rows}
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
    wanted.update({c: cfg for c, cfg in (("seeded", ({"seeded_dropout": True}, True, False)),
                                         ("seeded+ckpt", ({"seeded_dropout": True}, True, True)))
                   if c in parity_configs})
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


def _split_rows(text: str, known: dict) -> list[str]:
    """Row names contain commas ("ours+graph,seeded"): match the longest known name at each position."""
    rows, rest = [], text
    while rest:
        name = max((k for k in known if rest == k or rest.startswith(k + ",")), key=len, default=None)
        if name is None:
            raise ValueError(f"--rows: cannot read {rest!r}; known: {sorted(known)}")
        rows.append(name)
        rest = rest[len(name) + 1:]
    return rows


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
