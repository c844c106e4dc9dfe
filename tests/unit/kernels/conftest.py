"""Every fast path in lorafit.kernels equals its reference, forward and gradients, on small shapes.

The Triton kernels run on CPU through Triton's interpreter when triton is importable (tests/conftest.py
turns the interpreter on before anything imports lorafit.kernels, when there is no GPU, and keeps it for
this folder only); without triton those cases skip and the pure-torch fused paths (LoRA groups, chunked
cross-entropy, the fused modules' fallbacks) are still checked. GPU timings and errors at model sizes:
benchmarks/bench_speed.py. Shared helpers (tolerances, a tiny PEFT model) are in helpers.py.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def torch_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole-model tests take the torch paths on CPU: the interpreter is too slow for them, and each
    kernel is held to its reference in its own file (on GPU, bench_speed's grad parity covers the whole model)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("LORAFIT_NO_TRITON", "1")
