"""A run's config as the detectors read it: lorafit's config.yaml (validated), or another tool's
launch YAML (LLaMA-Factory's, or TrainingArguments keys) mapped onto lorafit's names.

A config that cannot be read is an error naming file, line and field, never "no config": a
diagnosis built on silently assumed defaults would judge the run against settings it never had.
Keys a tool's YAML leaves out take that tool's own defaults (transformers' TrainingArguments,
LLaMA-Factory's FinetuningArguments/DataArguments), because that is what the run trained with.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .. import rundir as R
from ..errors import ConfigError
from .records import as_count, as_number as _num

# tool key -> (lorafit key, integer?)
NUMBERS = {
    "learning_rate": ("learning_rate", False), "num_train_epochs": ("num_epochs", False),
    "max_steps": ("max_steps", True), "per_device_train_batch_size": ("batch_size", True),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", True),
    "max_grad_norm": ("max_grad_norm", False), "weight_decay": ("weight_decay", False),
    "warmup_ratio": ("warmup_ratio", False), "logging_steps": ("logging_steps", False),
    "eval_steps": ("eval_steps", False), "save_steps": ("save_steps", False),
    "lora_dropout": ("lora_dropout", False), "lora_rank": ("lora_rank", True), "lora_alpha": ("lora_alpha", True),
    "cutoff_len": ("max_length", True), "val_size": ("val_size", False),
}
# What transformers' TrainingArguments and LLaMA-Factory use when the YAML does not say.
HF_DEFAULTS = {"learning_rate": 5e-5, "num_train_epochs": 3.0, "per_device_train_batch_size": 8,
               "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "weight_decay": 0.0,
               "warmup_steps": 0, "warmup_ratio": 0.0, "lr_scheduler_type": "linear", "max_steps": -1}
LF_DEFAULTS = {**HF_DEFAULTS, "lora_dropout": 0.0, "lora_rank": 8, "cutoff_len": 2048}
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "cosine_with_min_lr": "cosine", "constant": "constant",
              "constant_with_warmup": "constant", "inverse_sqrt": "inverse_sqrt"}


def coerce_number(value: Any, name: str, file: Path | None, line: int | None, integer: bool = False) -> float | int:
    """A config number as these tools read it ("1e-4" is a string to YAML 1.1, a float to them)."""
    v = _num(value)
    if v is None or not math.isfinite(v) or (integer and v != int(v)):
        raise ConfigError(f"expected {'an integer' if integer else 'a number'}, got {value!r}",
                          file=None if file is None else str(file), line=line, field=name)
    return int(v) if integer else v


def read_yaml_mapping(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """(mapping, {key: line}) of a YAML file; anything else is a ConfigError naming the file."""
    from ..safeyaml import load

    if not path.is_file():
        raise ConfigError("config file not found", file=str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", file=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    value, lines = load(text, str(path))
    if not isinstance(value, dict):
        raise ConfigError("config must be a mapping of key: value", file=str(path), line=1)
    return value, lines


def lorafit_config(path: Path, required: bool = False) -> dict[str, Any]:
    """A lorafit run's config.yaml as written (absent: {}), after checking it the way `train` does."""
    from ..config import load_config

    if not path.is_file() and not required:
        return {}
    load_config(path)   # raises ConfigError with file, line and field
    return read_yaml_mapping(path)[0]


def tool_config(path: Path | None, records: list[dict[str, Any]],
                kind: str = "llamafactory") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the tool's YAML as written, the same settings under lorafit's names) — ({}, {}) without one."""
    if path is None:
        return {}, {}
    raw, lines = read_yaml_mapping(path)
    merged = {**(LF_DEFAULTS if kind == "llamafactory" else HF_DEFAULTS), **raw}
    out: dict[str, Any] = {"source": kind}
    for key, (name, integer) in NUMBERS.items():
        if merged.get(key) is not None:
            out[name] = coerce_number(merged[key], key, path, lines.get(key), integer)
    if out.get("max_steps", -1) <= 0:
        out.pop("max_steps", None)
    sched = str(merged.get("lr_scheduler_type") or "linear")
    out["lr_scheduler"] = SCHEDULERS.get(sched, sched)
    ws = coerce_number(merged.get("warmup_steps") or 0, "warmup_steps", path, lines.get("warmup_steps"))
    out["warmup_steps"] = int(ws) if ws >= 1 else 0
    if 0 < ws < 1:   # transformers 5 reads a warmup_steps below 1 as a ratio
        out["warmup_ratio"] = ws
    total = _total_steps(records)
    if total:
        out["total_steps"] = total
        out["effective_warmup_steps"] = min(total, out["warmup_steps"] or math.ceil(out.get("warmup_ratio", 0) * total))
    elif out["warmup_steps"] or not out.get("warmup_ratio"):   # a ratio needs the run length; steps do not
        out["effective_warmup_steps"] = out["warmup_steps"]
    if merged.get("bf16") or merged.get("pure_bf16"):
        out["dtype"] = "bfloat16"
    elif merged.get("fp16"):
        out["dtype"] = "float16"
    if merged.get("neftune_noise_alpha"):
        out["augment"] = ["neftune"]   # already regularised by noise: no augmentation to add
    if merged.get("early_stopping_steps") and merged.get("load_best_model_at_end"):
        out["early_stopping_patience"] = coerce_number(merged["early_stopping_steps"], "early_stopping_steps",
                                                       path, lines.get("early_stopping_steps"), True)
    dataset_names(merged.get("dataset"), "dataset", path, lines.get("dataset"))
    names = dataset_names(merged.get("eval_dataset"), "eval_dataset", path, lines.get("eval_dataset"))
    if names:
        out["val_data"] = {n: n for n in names}
    return raw, out


def dataset_names(value: Any, name: str, file: Path | None, line: int | None) -> list[str]:
    """A `dataset` / `eval_dataset` value as LLaMA-Factory reads it: a name, comma-separated names or a
    list of names (empty when unset); anything else (5, true, a mapping) names file, line and field."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        items = value
    else:
        raise ConfigError(f"expected a dataset name, comma-separated names or a list of names, got {value!r}",
                          file=None if file is None else str(file), line=line, field=name)
    return [n.strip() for n in items if n.strip()]


def _total_steps(records: list[dict[str, Any]]) -> int | None:
    for r in records:
        total = as_count(r.get("total_steps"), positive=True) if r.get("type") == R.TYPE_EVENT else None
        if total and r.get("event") == R.START:
            return total
    return None
