"""What the speed benchmarks share: the real model shapes with random weights and the write-up's LoRA,
step timing (eager or one CUDA graph), batches, records, and a guard that keeps one failure from
losing a run. Used by bench_speed.py, bench_dist.py and their helpers."""
from __future__ import annotations

import gc
import math
import statistics
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lorafit.kernels import CudaGraphStep, causal_lm_loss  # noqa: E402

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


def timed(fn: Callable[[], Any], reps: int = 50) -> float:
    """ms per call of fn replayed from a CUDA graph (kernel micro-benchmarks: no launch gaps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


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


