"""FlatAdamW: the adapter as one flat buffer must update exactly as torch.optim.AdamW over the separate
tensors, and its checkpoints must be torch's per-parameter format (a run resumes under either)."""
from __future__ import annotations

import io

import pytest
import torch

from lorafit.training.optim import FlatAdamW, flat_grads

SHAPES = [(4, 16), (24, 4), (4, 16), (8, 4)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _run(opt, params, steps, start=0):
    for k in range(start, start + steps):
        for p, gr in zip(params, _grads(k)):
            p.grad.copy_(gr)
        opt.step()


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("fused", [None, True], ids=["plain", "fused"])
def test_flat_adamw_updates_and_checkpoints_like_adamw(fused):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, fused=fused)
    ref = _params()
    for p in ref:
        p.grad = torch.zeros_like(p)
    ref_opt = torch.optim.AdamW(ref, **kw)
    mine = _params()
    flat_grad = flat_grads(mine)
    opt = FlatAdamW(mine, flat_grad, **kw)
    assert all(p.data_ptr() == opt.flat[o:].data_ptr() for p, o in zip(mine, (0, 64, 160, 224)))
    _run(ref_opt, ref, 3)
    _run(opt, mine, 3)
    for a, b in zip(ref, mine):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)

    # torch's per-parameter format, interchangeable both ways
    sd, ref_sd = _save_load(opt.state_dict()), _save_load(ref_opt.state_dict())
    assert sd["param_groups"] == ref_sd["param_groups"] and sd["state"].keys() == ref_sd["state"].keys()
    for i in sd["state"]:
        for k in ("exp_avg", "exp_avg_sq"):
            assert sd["state"][i][k].shape == ref_sd["state"][i][k].shape
            assert torch.allclose(sd["state"][i][k], ref_sd["state"][i][k], rtol=1e-6, atol=1e-9)
        assert float(sd["state"][i]["step"]) == 3.0
    resumed = _params(seed=1)
    with torch.no_grad():
        for p, src in zip(resumed, mine):
            p.copy_(src)
    FlatAdamW_from_ref = FlatAdamW(resumed, flat_grads(resumed), **kw)
    FlatAdamW_from_ref.load_state_dict(ref_sd)  # a per-tensor AdamW checkpoint resumes on the flat one
    plain = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    for p in plain:
        p.grad = torch.zeros_like(p)
    plain_opt = torch.optim.AdamW(plain, **kw)
    plain_opt.load_state_dict(sd)  # and the flat one's on torch's
    _run(FlatAdamW_from_ref, resumed, 2, start=3)
    _run(plain_opt, plain, 2, start=3)
    _run(opt, mine, 2, start=3)
    _run(ref_opt, ref, 2, start=3)
    for a, b, c, d in zip(ref, mine, resumed, plain):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
        assert torch.allclose(a, c, rtol=1e-6, atol=1e-7) and torch.allclose(a, d, rtol=1e-6, atol=1e-7)


def test_flat_adamw_refuses_gradients_that_are_not_its_buffer():
    params = _params()
    grad = flat_grads(params)
    with pytest.raises(ValueError, match="views of"):
        FlatAdamW(list(reversed(params)), grad, lr=1e-3)
    with pytest.raises(ValueError, match="flat gradient"):
        FlatAdamW(_params(), torch.zeros(3), lr=1e-3)
    opt = FlatAdamW(_params(), flat_grads(_params()), lr=1e-3)
    with pytest.raises(ValueError, match="this run trains 4"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})
