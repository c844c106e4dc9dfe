"""``lorafit eval --model BASE --adapter DIR --val NAME=FILE ... --out OUT``: any PEFT adapter, no run folder.

Adapters trained by LLaMA-Factory (``saves/.../lora/sft``), a transformers Trainer (``checkpoint-N``) or
Unsloth are PEFT folders like lorafit's own, so they get the same evaluation as ``lorafit eval RUN``:
the same `EvalSet`, `measure` and `compare` of run.py (base pass with the adapter disabled, tuned pass
with it merged), over sets named on the command line instead of a run's config. Settings a run
folder would hold (generation length, batch, metric mode, max_length) take lorafit's config defaults.

Everything that can be checked before the model runs is checked first -- every file, and that the
adapter's LoRA matrices fit the base's layers -- and the outputs are written to a staging folder moved
into OUT at the end, so a failure leaves OUT as it was.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..config import FIELDS
from ..data import ensure_template, group_references, read_examples
from ..errors import ConfigError, RunError
from ..model import load_adapter, load_model, load_tokenizer
from ..rundir import METRICS_JSON
from .metrics import MODES
from .run import STATS_INFO, EvalSet, compare, measure, write_metrics

_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


def _default(name: str) -> Any:
    return FIELDS[name].default


def _check_out(out: Path, names: list[str]) -> None:
    """OUT is new, empty, or an earlier `lorafit eval --out` (its metrics.json names an adapter): a folder of
    the user's own files is never written into, and no user file is replaced by one of ours."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError("exists and is not a folder", file=str(out), field="--out")
    entries = [p.name for p in out.iterdir()]
    if not entries:
        return
    try:
        earlier = json.loads((out / METRICS_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and "adapter" in earlier and "sets" in earlier):
        raise ConfigError(f"folder is not empty ({', '.join(sorted(entries)[:3])}) and is not an earlier "
                          "`lorafit eval --out`: choose a new folder", file=str(out), field="--out")


def evaluate_adapter(model: str, adapter: str | Path, val: dict[str, str | Path], out: str | Path, *,
                     general: str | Path | None = None, max_new_tokens: int | None = None,
                     batch_size: int | None = None, max_samples: int | None = None, mode: str | None = None,
                     device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Base vs base+adapter on each named set (and `general`); writes OUT/metrics.json, metrics.md and
    the predictions, and returns the metrics.json dict (run.py's shape, plus the model and adapter)."""
    mode = mode or _default("metric_mode")
    if mode not in MODES:
        raise ConfigError(f"unknown metric mode {mode!r}; expected one of {MODES}", field="mode")
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise RunError("no adapter_config.json: not a PEFT adapter folder", file=str(adapter))
    sets = {name: group_references(read_examples(path)) for name, path in val.items()}
    if general is not None:
        sets["general"] = group_references(read_examples(general))
    if max_samples:
        sets = {n: exs[:max_samples] for n, exs in sets.items()}
    if not sets:
        raise ConfigError("no validation set given", field="--val")
    _check_out(Path(out), list(sets))

    tok = ensure_template(load_tokenizer(model), _default("template"))
    base = load_model(model, device=device, dtype=_default("dtype"))
    check_adapter_fits(base, adapter, model)
    try:
        tuned = load_adapter(base, adapter)
    except (ValueError, RuntimeError, KeyError, OSError) as e:   # PEFT's own refusal, as one line
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise RunError(f"PEFT cannot load this adapter onto {model}: {first[:300]}", file=str(adapter)) from None
    tuned.eval()
    todo = [EvalSet.of(name, exs, tok, None) for name, exs in sets.items()]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        opts = dict(tok=tok, out_dir=stage, max_new_tokens=max_new_tokens or _default("max_new_tokens"),
                    batch_size=batch_size or _default("eval_batch_size"), max_length=_default("max_length"),
                    system_prompt=None, progress=progress)
        with tuned.disable_adapter():   # the base model's numbers
            before = {s.name: measure(tuned, s, "base", **opts) for s in todo}
        tuned.merge_adapter()
        metrics: dict[str, Any] = {"mode": mode, "stats": STATS_INFO, "model": str(model),
                                   "adapter": str(adapter.resolve()), "sets": {}}
        for s in todo:
            metrics["sets"][s.name] = compare(s, before[s.name], measure(tuned, s, "tuned", **opts), mode)
        write_metrics(stage, metrics)   # metrics.json and metrics.md, as `lorafit eval RUN` writes them
        out.mkdir(exist_ok=True)
        for f in stage.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return metrics


def check_adapter_fits(base: Any, adapter: Path, model: str) -> None:
    """Every LoRA matrix of the adapter against the base layer it wraps: a missing layer or a shape that
    differs means the adapter was trained on another base. PEFT itself would fail with a page of state-dict
    errors, or -- for a missing layer -- only warn and evaluate a partly applied adapter."""
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return   # an old adapter_model.bin: PEFT's own loading checks the shapes
    from safetensors import safe_open

    trained_on = _trained_on(adapter)
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:   # safetensors raises its own error types for a damaged header
        raise RunError(f"cannot read adapter weights: {e}", file=str(weights)) from None
    for key, shape in shapes.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            continue
        path, which = m.groups()
        try:
            layer = base.get_submodule(path)
        except AttributeError:
            raise RunError(f"adapter for another base model{trained_on}: {model} has no layer {path}",
                           file=str(adapter)) from None
        w = getattr(layer, "weight", None)
        if w is None or w.dim() != 2 or len(shape) != 2:
            continue
        out_f, in_f = w.shape
        fits = shape[1] == in_f if which == "A" else shape[0] == out_f
        if not fits:
            want = f"in_features {in_f}" if which == "A" else f"out_features {out_f}"
            raise RunError(f"adapter for another base model{trained_on}: lora_{which} of {path} has shape "
                           f"{list(shape)}, {model}'s layer has {want}", file=str(adapter))


def _trained_on(adapter: Path) -> str:
    try:
        name = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (trained on {name})" if name else ""
