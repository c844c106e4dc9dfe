"""Kernel micro-benchmark timing: milliseconds per call of a function replayed from a CUDA graph, so launch
gaps do not count (micro_dropout_mm.py, micro_fold.py)."""
from __future__ import annotations

from typing import Any, Callable


def timed(fn: Callable[[], Any], reps: int = 50) -> float:
    """ms per call of fn: three warm-up calls on a side stream, one capture, `reps` timed replays."""
    import torch

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
