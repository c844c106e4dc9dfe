"""Attention kernels for the bucketed step's rows on one GPU: FlashAttention-2 varlen (what lorafit runs), cuDNN
through `aten._cudnn_attention_forward` with cumulative lengths (a varlen cuDNN path), and SDPA's cuDNN and flash
backends on rows of equal length (GQA native or k/v expanded). Output and gradient error against FA2, and
forward / forward+backward time per call (eager, so each includes autograd's host time).

    python benchmarks/micro_attention.py        # on a GPU; writes $OUT/attn_probe.json (or /tmp)

Llama-3-8B's attention shape: 32 query heads, 8 key/value heads, head size 128, bf16.
"""
import torch, time, json, os, traceback
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
torch.manual_seed(0)
dev = "cuda"
H, HK, D = 32, 8, 128
scale = D ** -0.5
res = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}

def timeit(fn, n=30):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3

def make(lens):
    T = sum(lens)
    q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, HK, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, HK, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), device=dev, dtype=torch.int32)
    go = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    return q, k, v, cu, go

def fa2(q, k, v, cu, m):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, m, m, 0.0, True, False, scale=scale)[0]

def cudnn_thd(q, k, v, cu, m):
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, m, m, True, 0.0, True, False, scale=scale)[0]

def cudnn_thd_exp(q, k, v, cu, m):
    r = H // HK
    k2 = k.repeat_interleave(r, dim=1); v2 = v.repeat_interleave(r, dim=1)
    return torch.ops.aten._cudnn_attention_forward(q, k2, v2, None, cu, cu, m, m, True, 0.0, True, False, scale=scale)[0]

def rows(backend, gqa):
    def f(q, k, v, cu, m):
        b = cu.numel() - 1; s = m
        qq, kk, vv = (t.view(b, s, -1, D).transpose(1, 2) for t in (q, k, v))
        if not gqa:
            r = H // HK
            kk = kk[:, :, None].expand(b, HK, r, s, D).reshape(b, H, s, D); vv = vv[:, :, None].expand(b, HK, r, s, D).reshape(b, H, s, D)
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, **({"enable_gqa": True} if gqa else {}))
        return o.transpose(1, 2).reshape(-1, H, D)
    return f

cases = {"rows2x1024": [1024, 1024], "bitext": [181, 250, 93, 402, 120, 210], "long": [2048]}
methods = {"fa2": fa2, "cudnn_thd": cudnn_thd, "cudnn_thd_expand": cudnn_thd_exp,
           "sdpa_cudnn_gqa": rows(SDPBackend.CUDNN_ATTENTION, True), "sdpa_cudnn_expand": rows(SDPBackend.CUDNN_ATTENTION, False),
           "sdpa_flash_gqa": rows(SDPBackend.FLASH_ATTENTION, True)}
for cname, lens in cases.items():
    q, k, v, cu, go = make(lens)
    m = max(lens)
    ref = None
    for mname, fn in methods.items():
        key = f"{cname}/{mname}"
        if mname.startswith("sdpa") and len(set(lens)) > 1:
            continue
        try:
            for t in (q, k, v): t.grad = None
            o = fn(q, k, v, cu, m); o.backward(go)
            got = [o.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
            if ref is None: ref = got
            err = [float((a - b).abs().max()) for a, b in zip(got, ref)]
            def step():
                o = fn(q, k, v, cu, m); o.backward(go)
            def fwd():
                with torch.no_grad(): fn(q, k, v, cu, m)
            res[key] = {"max_abs_err_vs_fa2(o,dq,dk,dv)": err, "fwd_ms": timeit(fwd), "fwd_bwd_ms": timeit(step)}
        except Exception as e:
            res[key] = {"error": repr(e)[:400]}
        print(key, res[key], flush=True)
open(os.path.join(os.environ.get("OUT", "/tmp"), "attn_probe.json"), "w").write(json.dumps(res, indent=1))
