"""Each fused path against its reference on the GPU at model-sized shapes: error and time.

The CPU tests hold the maths together on small shapes; this is the same comparison for the compiled
kernels on the real device (`python -c "from lorafit.kernels.selfcheck import check_kernels; print(check_kernels())"`).
Errors are ||fused - reference|| / ||reference||, the reference computed in float32 from the same bf16
inputs; times are the median of CUDA-event timed forward + backward passes.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from .attention import varlen_attention, varlen_attention_reference
from .cross_entropy import causal_lm_loss_reference, fused_causal_lm_loss
from .dropout import DropoutSeed, seeded_keep_mask
from .lora import LoraProj, lora_group, lora_group_reference
from .rmsnorm import rms_norm, rms_norm_reference
from .rotary import rope, rope_reference
from .swiglu import swiglu, swiglu_reference

__all__ = ["check_kernels"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def _fwd_bwd(fn: Callable[..., Any], inputs: list[torch.Tensor], seed: int = 0) -> tuple[list[torch.Tensor], list]:
    """Outputs and input gradients of fn for a fixed random upstream gradient."""
    outs = fn(*inputs)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    g = torch.Generator(device=outs[0].device).manual_seed(seed)
    grads = [torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [None if t.grad is None else t.grad.detach() for t in inputs]


def _time(fn: Callable[[], Any], reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _compare(fused: Callable, ref: Callable, inputs: list[torch.Tensor]) -> dict[str, Any]:
    """Run fused on bf16 leaves and ref on float32 leaves of the same values; time both in bf16."""
    fi = [_leaf(t) if t.is_floating_point() else t for t in inputs]
    ri = [_leaf(t, torch.float32) if t.is_floating_point() else t for t in inputs]
    fo, fg = _fwd_bwd(fused, fi)
    ro, rg = _fwd_bwd(ref, ri)
    res: dict[str, Any] = {"out_rel_err": max(_rel(a, b) for a, b in zip(fo, ro))}
    grads = [_rel(a, b) for a, b in zip(fg, rg) if a is not None and b is not None]
    res["grad_rel_err"] = max(grads) if grads else None

    def step(fn: Callable, leaves: list[torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for t in leaves:
                if t.is_floating_point():
                    t.grad = None
            outs = fn(*leaves)
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return run

    res["fused_ms"] = _time(step(fused, fi))
    res["reference_ms"] = _time(step(ref, [_leaf(t) if t.is_floating_point() else t for t in inputs]))
    return res


def check_kernels(model: torch.nn.Module | None = None, tokens: int = 2048) -> dict[str, Any]:
    """Compare every fused path with its reference at the model's sizes (Llama-3-8B's without a model)."""
    cfg = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "config", None)
    hid = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", 14336)
    heads = getattr(cfg, "num_attention_heads", 32)
    kv = getattr(cfg, "num_key_value_heads", 8)
    vocab = getattr(cfg, "vocab_size", 128256)
    d = hid // heads
    dev, bf = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    r = lambda *s, scale=1.0: (torch.randn(*s, device=dev) * scale).to(bf)  # noqa: E731
    out: dict[str, Any] = {}

    def case(name: str, fn: Callable[[], dict]) -> None:
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 - report and go on with the other kernels
            out[name] = {"error": f"{type(e).__name__}: {e}"}

    w = (torch.rand(hid, device=dev) + 0.5).to(bf)
    case("rms_norm", lambda: _compare(lambda x: rms_norm(x, w, 1e-5),
                                      lambda x: rms_norm_reference(x, w.to(x.dtype), 1e-5), [r(tokens, hid)]))
    case("swiglu", lambda: _compare(swiglu, swiglu_reference, [r(tokens, inter), r(tokens, inter)]))
    pos = torch.arange(tokens // 2, device=dev)[None].expand(2, -1).float()
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(bf), emb.sin().to(bf)
    case("rope", lambda: _compare(lambda q: rope(q, cos, sin), lambda q: rope_reference(q, cos.to(q.dtype), sin.to(q.dtype)),
                                  [r(2, tokens // 2, heads, d)]))

    def lora_case(d_in: int, outs: list[int], seeded: bool) -> dict:
        ws = [r(o, d_in, scale=d_in ** -0.5) for o in outs]
        a_s = [torch.randn(16, d_in, device=dev) * d_in ** -0.5 for _ in outs]
        b_s = [torch.randn(o, 16, device=dev) * 0.05 for o in outs]
        k = len(outs)
        seed = DropoutSeed(dev, 11)
        mask = (seeded_keep_mask((tokens, d_in), seed.value, 5, 0.1, dev) if seeded
                else torch.rand(tokens, d_in, device=dev) > 0.1)

        def run(impl: Callable, fused: bool) -> Callable:
            def f(x: torch.Tensor, *ab: torch.Tensor) -> list[torch.Tensor]:
                projs = [LoraProj(wi.to(x.dtype), None, ab[i], ab[k + i], 2.0) for i, wi in enumerate(ws)]
                if fused and seeded:
                    return impl(x, projs, 0.1, True, seed=(seed.value, 5))
                return impl(x, projs, 0.1, True, mask=mask)
            return f

        inputs = [r(tokens, d_in)] + [t.float() for t in a_s + b_s]
        res = _compare(run(lora_group, True), run(lora_group_reference, False), inputs)
        res["what"] = (f"{k} projection(s) {d_in} -> {outs}, r 16, dropout 0.1 (one mask"
                       + (", seeded: drawn inside the rank-r products" if seeded else "")
                       + "); reference = PEFT maths in float32")
        return res

    case("lora_qkv", lambda: lora_case(hid, [heads * d, kv * d, kv * d], False))
    case("lora_qkv_seeded", lambda: lora_case(hid, [heads * d, kv * d, kv * d], True))
    case("lora_down_seeded", lambda: lora_case(inter, [hid], True))

    def ce_case() -> dict:
        head = r(vocab, hid, scale=hid ** -0.5)
        labels = torch.randint(0, vocab, (2, tokens // 2), device=dev)
        labels[:, :10] = -100
        res = _compare(lambda h: fused_causal_lm_loss(h, head, labels),
                       lambda h: causal_lm_loss_reference(h, head.to(h.dtype), labels), [r(2, tokens // 2, hid)])
        for name, fn in (("fused", fused_causal_lm_loss), ("reference", causal_lm_loss_reference)):
            h = r(2, tokens // 2, hid).requires_grad_(True)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(h, head, labels).backward()
            res[f"{name}_extra_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        return res

    case("linear_cross_entropy", ce_case)
    cu = torch.tensor([0, 300, 1000, 1010, 1500, tokens], device=dev, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    case("varlen_attention", lambda: _compare(lambda q, k, v: varlen_attention(q, k, v, cu, longest, d ** -0.5),
                                              lambda q, k, v: varlen_attention_reference(q, k, v, cu, d ** -0.5),
                                              [r(tokens, heads, d), r(tokens, kv, d), r(tokens, kv, d)]))
    return out
