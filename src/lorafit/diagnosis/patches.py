"""Config patches: the TrainConfig changes a finding recommends, and how several combine.

Patches are built from the run's own resolved config (halve *this* run's learning rate, not a
generic one), and merged conservatively when several findings touch the same key: the lower
learning rate, the shorter run, the stronger regularisation wins.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import RunError
from .findings import Finding, sort_findings
from .records import as_count
from .toolconfig import dataset_names

DEFAULTS = {"learning_rate": 1e-4, "max_grad_norm": 1.0, "warmup_ratio": 0.1, "warmup_steps": 20,
            "gradient_accumulation_steps": 1, "lora_dropout": 0.1, "weight_decay": 0.0, "num_epochs": 5}


def round_sig(x: float, digits: int = 2) -> float:
    """1.2345e-4 -> 1.2e-4: learning rates read better with two significant digits."""
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def _get(s: Any, key: str) -> Any:
    v = s.config.get(key)
    return DEFAULTS.get(key) if v is None else v


def lower_lr(s: Any, factor: float) -> dict[str, Any]:
    lr = s.peak_lr or _get(s, "learning_rate")
    return {"learning_rate": round_sig(lr * factor)}


def safer_clipping(s: Any) -> dict[str, Any]:
    clip = s.config.get("max_grad_norm")
    if clip is None or clip == 0 or clip > 1.0:
        return {"max_grad_norm": 1.0}
    return {}


def longer_warmup(s: Any, force: bool = False) -> dict[str, Any]:
    """Warmup of ~10% of the run (the write-up's default), only when the current one is shorter."""
    total = s.total_steps or 0
    w = s.warmup_steps()
    if not force and w is not None and total and w >= 0.05 * total:
        return {}
    ratio = max(0.1, float(s.config.get("warmup_ratio") or 0.0))
    steps = max(20, int(s.config.get("warmup_steps") or 0))
    if total:
        steps = min(steps, max(1, total // 5))
    return {"warmup_ratio": ratio, "warmup_steps": steps}


def _union(a: list[str], b: list[str]) -> list[str]:
    return list(dict.fromkeys(list(a) + list(b)))


_MERGE: dict[str, Callable[[Any, Any], Any]] = {
    "learning_rate": min, "num_epochs": min, "max_steps": min, "max_grad_norm": min,
    "lora_dropout": max, "weight_decay": max, "warmup_ratio": max, "warmup_steps": max,
    "gradient_accumulation_steps": max, "early_stopping_patience": min, "general_ratio": max,
    "augment": _union, "general_data": _union, "max_length": max,
}


def merge_patches(findings: list[Finding]) -> dict[str, Any]:
    """One patch from all findings; most severe findings first, conflicts resolved per key."""
    out: dict[str, Any] = {}
    for f in sort_findings(findings):
        for k, v in f.config_patch.items():
            out[k] = _MERGE.get(k, lambda old, new: old)(out[k], v) if k in out else v
    return out


# --- the same fixes in another tool's words -------------------------------------------------------
# lorafit key -> the key LLaMA-Factory (and transformers' TrainingArguments) reads for the same thing.
TOOL_KEYS = {"learning_rate": "learning_rate", "num_epochs": "num_train_epochs", "max_steps": "max_steps",
             "max_grad_norm": "max_grad_norm", "weight_decay": "weight_decay",
             "gradient_accumulation_steps": "gradient_accumulation_steps", "batch_size": "per_device_train_batch_size"}
LF_ONLY = {"lora_dropout": "lora_dropout", "lora_rank": "lora_rank", "lora_alpha": "lora_alpha",
           "max_length": "cutoff_len", "val_size": "val_size"}
NEFTUNE_ALPHA = 5.0   # the NEFTune paper's value for 7B-scale SFT: noise on embeddings, LF and HF both have it
GENERAL_SET = "alpaca_en"   # LLaMA-Factory's own general instruction set (data/dataset_info.json, from the hub)


def _warmup(patch: dict[str, Any], total: int | None) -> int:
    """lorafit's rule (the larger of warmup_steps and ratio x total) as the one integer warmup_steps that
    transformers 4 and 5 both read (5 dropped warmup_ratio; in 4 warmup_steps > 0 wins over it)."""
    steps = int(patch.get("warmup_steps") or 0)
    if total:
        return min(total, max(steps, math.ceil(float(patch.get("warmup_ratio") or 0) * total)))
    return max(steps, 1)


def in_tool_words(patch: dict[str, Any], kind: str, tool_cfg: dict[str, Any] | None = None,
                  total_steps: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """A lorafit patch as (the tool's keys -> values, None = remove the key; notes for fixes with no key).

    kind is "llamafactory" (its YAML: TrainingArguments plus its own finetuning and data keys) or
    "hf_trainer" (TrainingArguments names; LoRA and data settings live elsewhere and become notes).
    """
    lf = kind == "llamafactory"
    cfg = tool_cfg or {}
    out: dict[str, Any] = {}
    notes: list[str] = []
    for k, v in patch.items():
        if k in TOOL_KEYS:
            out[TOOL_KEYS[k]] = v
        elif k in LF_ONLY and lf:
            out[LF_ONLY[k]] = v
        elif k in ("lora_dropout", "lora_rank", "lora_alpha"):
            notes.append(f"LoraConfig({'r' if k == 'lora_rank' else k}={v})")
        elif k == "max_length":
            notes.append(f"tokenize with max_length={v} (examples are being truncated)")
        elif k == "dtype" and v == "bfloat16":
            out.update(bf16=True, fp16=False)
    if "warmup_ratio" in patch or "warmup_steps" in patch:
        out["warmup_steps"] = _warmup(patch, total_steps)
        if "warmup_ratio" in cfg:
            out["warmup_ratio"] = None
    if "early_stopping_patience" in patch:
        out.update(load_best_model_at_end=True, metric_for_best_model="eval_loss")
        out.update(_same_save_and_eval(cfg))
        if lf:
            out["early_stopping_steps"] = patch["early_stopping_patience"]
        else:
            notes.append(f"callbacks=[EarlyStoppingCallback(early_stopping_patience={patch['early_stopping_patience']})]")
    if "augment" in patch:
        out["neftune_noise_alpha"] = NEFTUNE_ALPHA
        notes.append("neftune_noise_alpha: noise on the embeddings while training, the regulariser these tools "
                     "have in place of lorafit's prompt augmentation")
    if "val_size" in patch:
        out.update(eval_strategy="steps", eval_steps=as_count(cfg.get("save_steps"), positive=True) or 100)
        if not lf:
            notes.append("pass an eval_dataset (10% of the data held out) to the Trainer")
    if "general_ratio" in patch:
        out.update(_general_mix(cfg, float(patch["general_ratio"]), lf, notes))
    return out, notes


def _same_save_and_eval(cfg: dict[str, Any]) -> dict[str, Any]:
    """load_best_model_at_end needs saves where evaluations are (TrainingArguments refuses otherwise)."""
    strategy = cfg.get("eval_strategy") or cfg.get("evaluation_strategy") or "steps"
    out: dict[str, Any] = {"eval_strategy": strategy, "save_strategy": strategy}
    ev, sv = cfg.get("eval_steps"), cfg.get("save_steps")
    if strategy == "steps":
        ev = ev or sv or 100
        out["eval_steps"] = ev
        if not (isinstance(sv, int) and isinstance(ev, int) and sv % ev == 0):
            out["save_steps"] = ev
    return out


def _general_mix(cfg: dict[str, Any], ratio: float, lf: bool, notes: list[str]) -> dict[str, Any]:
    """General-domain data mixed in at `ratio`: LLaMA-Factory's interleave strategy over its datasets."""
    names = dataset_names(cfg.get("dataset"), "dataset", None, None)   # checked when the config was read
    if not lf or not names or cfg.get("eval_dataset"):
        # without the dataset list (or with eval_dataset, whose count interleave_probs must also match)
        # the probabilities cannot be written for this config
        notes.append(f"mix general instruction data in at {ratio:.0%} of the examples (LLaMA-Factory: add e.g. "
                     f"{GENERAL_SET} to dataset, mix_strategy: interleave_under, interleave_probs per dataset)")
        return {}
    names = [n for n in names if n != GENERAL_SET]
    share = round((1 - ratio) / len(names), 4)
    notes.append(f"{GENERAL_SET} is LLaMA-Factory's general instruction set (downloaded from the hub); any "
                 "general set named in dataset_info.json works")
    return {"dataset": ",".join(names + [GENERAL_SET]), "mix_strategy": "interleave_under",
            "interleave_probs": ",".join([f"{share:g}"] * len(names) + [f"{ratio:g}"])}


def tool_patches(findings: list[Finding], kind: str, tool_cfg: dict[str, Any] | None = None,
                 total_steps: int | None = None) -> list[Finding]:
    """Copies of the findings whose config_patch is in the tool's words (removals left out)."""
    import dataclasses

    out = []
    for f in findings:
        words, _ = in_tool_words(f.config_patch, kind, tool_cfg, total_steps)
        out.append(dataclasses.replace(f, config_patch={k: v for k, v in words.items() if v is not None}))
    return out


def write_tool_config(findings: list[Finding], out: str | Path, kind: str, tool_cfg: dict[str, Any],
                      source_file: Path | None, total_steps: int | None) -> dict[str, Any]:
    """The launch YAML with every finding's fix applied, in the tool's own keys (the patch alone as a key
    list when there was no YAML to start from); fixes with no key are comments at the top. Returns the
    tool-keyed patch. Written whole or not at all."""
    tool = "LLaMA-Factory" if kind == "llamafactory" else "HF Trainer (TrainingArguments)"
    words, notes = in_tool_words(merge_patches(findings), kind, tool_cfg, total_steps)
    if tool_cfg:
        doc = dict(tool_cfg)
        head = [f"# {tool} config from {source_file}, with the fixes of `lorafit diagnose` applied:"]
        for k, v in words.items():
            if doc.get(k) != v:
                head.append(f"#   {k}: {doc.get(k, '(unset)')} -> {'(removed)' if v is None else v}")
            if v is None:
                doc.pop(k, None)
            else:
                doc[k] = v
    else:
        doc = {k: v for k, v in words.items() if v is not None}
        head = [f"# The fixes of `lorafit diagnose` in {tool} keys (no launch config was given: merge these into yours)."]
    head += [f"# also: {n}" for n in notes]
    text = "\n".join(head) + "\n" + (yaml.safe_dump(doc, sort_keys=False, allow_unicode=True) if doc else "")
    out = check_target(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except OSError as e:
        raise RunError(f"cannot write the config: {e.strerror or e}", file=str(out)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return words


def check_target(out: str | Path) -> Path:
    """The --write-config path, checked before anything is written: not a folder, its folder created
    and writable (a probe file is made and removed). A RunError naming the path otherwise."""
    out = Path(out)
    if out.is_dir():
        raise RunError("is a folder: --write-config needs a file path", file=str(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"):
            pass
    except FileExistsError:
        raise RunError("cannot write here: a file stands where a folder of the path should be",
                       file=str(out)) from None
    except OSError as e:
        raise RunError(f"cannot write here: {e.strerror or e}", file=str(out)) from None
    return out
