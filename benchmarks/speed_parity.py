"""Numerical parity of lorafit's fast paths with HF + PEFT: LoRA gradients after one step, and loss
curves over N steps from the same adapter (bench_speed.py --parity-steps)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lorafit.kernels import accelerate_model, causal_lm_loss, restore_model  # noqa: E402

from speed_common import load_lora, random_batches, set_checkpointing, time_steps, guarded  # noqa: E402

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


