"""Fixtures for the tests on the real SmolLM2-135M-Instruct GGUF."""
from __future__ import annotations

import copy

import pytest


@pytest.fixture(scope="session")
def _gguf_loads() -> dict:
    return {}


@pytest.fixture
def gguf_loaded_once(monkeypatch, _gguf_loads):
    """Building the tokenizer from the GGUF's vocabulary and de-quantising its weights costs ~18 s on two
    cores, and these tests would pay it four times (evaluate_run; train, then `generate` base and tuned).
    Each distinct load (`lorafit.model._pretrained`: the loader, path and arguments) runs for real once per
    session; every later one gets a deep copy of that pristine result (never the copy a caller changed: the
    trainer wraps its model in LoRA layers in place), so each caller still sees a freshly loaded object."""
    from lorafit import model as M

    real = M._pretrained

    def once(load, model, path, **kw):
        key = (repr(getattr(load, "__self__", load)), getattr(load, "__name__", ""), model, str(path),
               repr(sorted(kw.items())))
        if key not in _gguf_loads:
            _gguf_loads[key] = real(load, model, path, **kw)
        return copy.deepcopy(_gguf_loads[key])

    monkeypatch.setattr(M, "_pretrained", once)
