"""`CudaGraphStep` (`kernels/graphs.py`): the parts that run without a GPU."""
from __future__ import annotations

import pytest
import torch


def test_graph_step_refuses_an_optimizer_it_cannot_capture() -> None:
    from lorafit.kernels import CudaGraphStep

    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="capturable"):
        CudaGraphStep(torch.nn.Linear(3, 3), torch.optim.AdamW([w], capturable=False), {})


def test_graph_snapshot_on_host_restores_parameters_and_state() -> None:
    """CudaGraphStep's warm-up undo (device-free parts): a host snapshot puts values and state back."""
    from lorafit.kernels import CudaGraphStep

    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(4)
    opt.step()
    step = CudaGraphStep.__new__(CudaGraphStep)
    step.params, step.optimizer = [w], opt
    before = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
    saved = step._snapshot("cpu")
    for _ in range(2):
        opt.step()
    step._restore(saved)
    assert torch.equal(w.detach(), before[0])
    assert all(torch.equal(opt.state[w][k], v) for k, v in before[1].items())
