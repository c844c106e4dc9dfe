"""lorafit: LoRA fine-tuning that tells you, with evidence, whether the fine-tune worked.

The public API (what the `lorafit` command wraps): train, generate, merge, evaluate, score,
diagnose, report, demo; the config schema is `lorafit.config.TrainConfig`. The work lives in
subpackages named for what they are (`training`, `evaluation`, `diagnosis`, `reporting`, `blind`,
`kernels`), so no API function shares a name with a module.

Names are imported on first use (a module `__getattr__`, as litgpt does): `import lorafit` stays
cheap and never loads torch's GPU kernels or Triton.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = ("demo", "diagnose", "evaluate", "generate", "merge", "report", "score", "train")
_LAZY = {**{name: "api" for name in _API}, "TrainConfig": "config", "load_config": "config",
         **{name: "errors" for name in ("ConfigError", "DataError", "LorafitError", "RunError", "TrainingError")}}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lorafit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
