"""The adapter as flat buffers: its gradients (what the bucketed step's graphs accumulate into) and, for
the optimizer, its parameters, with AdamW stepping them as one tensor.

Why: a LoRA adapter on every linear layer of an 8B model is 448 small tensors (42M parameters). torch's
fused AdamW over them costs 1.13 ms a step on an H200, over one flat tensor of the same size 0.34 ms
(`benchmarks/micro_adamw.py`); on two GPUs, each with half a step's work, that difference is ~1% of a
step. The parameters become views of one float32 buffer, as their gradients already are of
`BucketedStep.flat_grad`, and the optimizer holds that buffer as its one parameter: same update, element by
element, as torch.optim.AdamW over the separate tensors.

Checkpoints keep torch's per-parameter format (`state_dict` splits the moments, `load_state_dict` joins
them), so a checkpoint written by one step kind resumes under any other.
"""
from __future__ import annotations

from typing import Any

import torch


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of `flat` shaped like each tensor of `like`, in order."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def flat_grads(params: list[torch.Tensor]) -> torch.Tensor | None:
    """Give every parameter a gradient that is a view of one flat buffer (returned), keeping any values
    already there; None (separate buffers) when the parameters do not share a dtype and device."""
    if not params or len({(p.dtype, p.device) for p in params}) > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return None
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    for p, view in zip(params, _views(flat, params)):
        if p.grad is not None:
            view.copy_(p.grad)
        p.grad = view
    return flat


class FlatAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over `params` (one dtype and device), stepped as one tensor whose gradient is
    `grad` (a flat buffer the parameters' `.grad` are views of, in the same order)."""

    def __init__(self, params: list[torch.Tensor], grad: torch.Tensor, **kwargs: Any) -> None:
        if not params or len({(p.dtype, p.device) for p in params}) > 1:
            raise ValueError("FlatAdamW needs parameters of one dtype and device")
        n = sum(p.numel() for p in params)
        if grad.numel() != n or grad.dtype != params[0].dtype:
            raise ValueError(f"flat gradient of {grad.numel()} {grad.dtype} for {n} {params[0].dtype} parameters")
        if any(p.grad is not None and p.grad.data_ptr() != g.data_ptr() for p, g in zip(params, _views(grad, params))):
            raise ValueError("the parameters' gradients are not views of `grad` in the parameters' order")
        flat = torch.empty(n, dtype=params[0].dtype, device=params[0].device)
        with torch.no_grad():
            for p, view in zip(params, _views(flat, params)):
                view.copy_(p)
                p.data = view  # the module keeps its Parameter; its storage is now the flat buffer
        self.flat = torch.nn.Parameter(flat)
        self.flat.grad = grad
        self.views = list(params)
        super().__init__([self.flat], **kwargs)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        st = sd["state"].get(0, {})
        split = {k: _views(v, self.views) for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
        per = {i: {k: split[k][i] if k in split else (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
               for i in range(len(self.views))} if st else {}
        groups = [{**g, "params": list(range(len(self.views)))} for g in sd["param_groups"]]
        return {"state": per, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per, groups = state_dict["state"], state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.views):
            raise ValueError(f"optimizer state for {sum(len(g['params']) for g in groups)} parameters in "
                             f"{len(groups)} groups; this run trains {len(self.views)} in one")
        flat_state: dict[str, Any] = {}
        if per:
            first = per[groups[0]["params"][0]]
            for k, v in first.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    flat_state[k] = torch.cat([per[i][k].reshape(-1).to(self.flat.device, self.flat.dtype)
                                               for i in groups[0]["params"]])
                else:
                    flat_state[k] = v
        super().load_state_dict({"state": {0: flat_state} if per else {},
                                 "param_groups": [{**groups[0], "params": [0]}]})
