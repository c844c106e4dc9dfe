"""One typed config: the single source of truth for names, defaults, validation and help text.

Defaults are the write-up's settings (5 epochs, lr 1e-4, batch 2, max length 1024, LoRA r 16 /
alpha 32 / dropout 0.1, warmup ratio 0.1 *and* warmup steps 20, warmup-then-decay schedule).

Warmup rule (both settings are given by the write-up): the effective number of warmup steps is
``min(total_steps, max(warmup_steps, ceil(warmup_ratio * total_steps)))``. Taking the larger of the
two keeps both guarantees the write-up asks for: at least 20 optimizer steps of warmup on short runs
(where 10% would be only a handful of steps and Adam's moment estimates are still noisy) and at least
10% of training on long runs (where 20 steps would be a negligible ramp). HF's Trainer instead lets a
non-zero ``warmup_steps`` silently override the ratio; we log and save the effective number instead.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

SCHEDULERS = ("cosine", "linear", "inverse_sqrt", "constant")
FORMATS = ("auto", "alpaca", "sharegpt", "text")
METRIC_MODES = ("llamafactory", "standard")
DTYPES = ("auto", "float32", "bfloat16", "float16")
AUGMENTATIONS = ("none", "prompt_variants", "word_dropout", "swap_adjacent")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text doubles as CLI help and YAML schema docs."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    model: str = _f("", "Base model: a local Hugging Face folder, a .gguf file, or a hub id.")
    data: list[str] = _f([], "Training data file(s): .json, .jsonl, .csv, or a LLaMA-Factory dataset_info.json entry 'DIR/dataset_info.json#name'.")
    val_data: dict[str, str] = _f({}, "Named validation sets: mapping name -> file. Each is evaluated and logged under its own name.")
    val_size: float = _f(0.0, "Hold out this share (0-1) or number (>=1) of training examples as validation set 'val'.")
    general_eval: str | None = _f(None, "General-domain set for forgetting checks (loss logged as split 'general'; metrics in eval).")
    general_data: list[str] = _f([], "General-domain files mixed into training against forgetting.")
    general_ratio: float = _f(0.0, "Share of the training mix drawn from general_data (0 disables mixing).")
    output_dir: str = _f("runs/run", "Run folder: adapter/, config.yaml, log.jsonl, loss.png, checkpoints/.")
    format: str = _f("auto", f"Data format: one of {FORMATS}; auto detects per file.")
    columns: dict[str, str] = _f({}, "Column mapping for CSV/JSON: lorafit field (instruction, input, output, system, history, conversations, messages, text) -> column name.")
    template: str = _f("auto", "Chat template: 'auto' uses the tokenizer's own; 'chatml' is the documented fallback for models without one.")
    system_prompt: str | None = _f(None, "System prompt for examples that carry none (None keeps the template's default).")
    train_on_prompt: bool = _f(False, "Also compute loss on prompt tokens (default: response tokens only).")
    max_length: int = _f(1024, "Truncate tokenized examples to this many tokens (prompt trimmed first, then response).")
    max_samples: int | None = _f(None, "Use at most this many training examples (after shuffling).")
    augment: list[str] = _f([], f"Text augmentations for training examples: {AUGMENTATIONS[1:]}.")
    augment_copies: int = _f(1, "Augmented copies added per training example when augment is set.")
    # --- LoRA ----------------------------------------------------------------------------------
    lora_rank: int = _f(16, "LoRA rank r.")
    lora_alpha: float = _f(32, "LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rsLoRA).")
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input path.")
    target_modules: list[str] | str = _f("all-linear", "Modules to adapt: 'all-linear' (every linear layer of the transformer blocks) or a list of names.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling (PEFT use_rslora).")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (PEFT use_dora).")
    # --- optimisation --------------------------------------------------------------------------
    num_epochs: float = _f(5, "Training epochs.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: num_epochs decides).")
    learning_rate: float = _f(1e-4, "Peak learning rate (AdamW).")
    batch_size: int = _f(2, "Examples per device per micro-batch (as in HF Trainer and LLaMA-Factory): the global batch "
                         "is batch_size x gradient_accumulation_steps x number of processes.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per device per optimizer step.")
    lr_scheduler: str = _f("cosine", f"Decay after warmup: one of {SCHEDULERS} (inverse_sqrt is the Transformer paper's).")
    min_lr_ratio: float = _f(0.0, "Floor of the decay as a share of the peak LR (cosine/linear).")
    warmup_ratio: float = _f(0.1, "Warmup as a share of total steps (combined with warmup_steps by taking the larger).")
    warmup_steps: int = _f(20, "Warmup steps (combined with warmup_ratio by taking the larger).")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (the optimizer shrinks weights; not a loss term).")
    l2_penalty: float = _f(0.0, "Classic L2 regularisation: the penalty l2_penalty * sum(w^2) over LoRA weights, added to the loss (as its gradient, before clipping).")
    max_grad_norm: float = _f(1.0, "Clip gradients to this global norm (0 disables).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    seed: int = _f(42, "Seed for shuffling, LoRA init and dropout.")
    max_nonfinite_steps: int = _f(3, "Stop after this many consecutive non-finite losses/gradients (each is skipped).")
    early_stopping_patience: int = _f(0, "Stop after this many evaluations without improvement of the first validation set (0: off); the best adapter is restored.")
    # --- logging, evaluation, checkpoints ------------------------------------------------------
    eval_steps: int = _f(50, "Evaluate every N optimizer steps (and at the end).")
    logging_steps: int = _f(10, "Log training loss every N optimizer steps.")
    save_steps: int = _f(100, "Checkpoint every N optimizer steps.")
    save_total_limit: int = _f(2, "Keep the last K checkpoints.")
    eval_batch_size: int = _f(8, "Batch size for validation loss and generation.")
    max_eval_samples: int | None = _f(None, "Evaluate at most this many examples per validation set.")
    # --- generation-based evaluation -----------------------------------------------------------
    max_new_tokens: int = _f(128, "Generation length for `lorafit eval`.")
    metric_mode: str = _f("llamafactory", f"Metrics mode: {METRIC_MODES}.")
    # --- hardware ------------------------------------------------------------------------------
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'.")
    dtype: str = _f("auto", f"{DTYPES}; auto: bfloat16 on GPU, float32 on CPU.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    packing: bool = _f(False, "Padding-free packing: each micro-batch is one row of whole examples laid end to end, "
                             "at most pack_tokens tokens, each attending only to itself (no padding).")
    pack_tokens: int | None = _f(None, "Tokens per pack with packing (None: batch_size x max_length). Packs hold more "
                                 "examples than padded batches, so an epoch has fewer optimizer steps: smaller packs "
                                 "or a higher learning_rate keep the per-epoch progress (docs/speed.md).")
    fused_kernels: bool = _f(False, "Use lorafit's fused LoRA kernels where available (GPU speed path); where Triton "
                             "runs, LoRA dropout is then drawn inside the fused products from (seed, micro-batch).")
    distributed: str = _f("auto", "Under torchrun: 'ddp' (the frozen base is replicated on every GPU, only LoRA gradients "
                          "are all-reduced), 'fsdp' (FSDP2: every weight, the frozen base included, is sharded over "
                          "the GPUs and gathered one decoder layer at a time; for a base that does not fit one GPU) or "
                          "'auto': FSDP when the base's parameters take more than 60% of one GPU's memory, else DDP; "
                          "always DDP on CPU.")
    dist_timeout: float = _f(600.0, "Under torchrun: seconds a process may wait in one collective (a gradient "
                             "reduction, an evaluation's all-reduce, a checkpoint barrier) before the run stops with "
                             "an error naming the phase, exit status 1, instead of hanging.")
    report_to: list[str] = _f([], "Experiment trackers that mirror log.jsonl (the source of truth): any of "
                              "tensorboard, wandb (offline unless configured), mlflow (file store in the run folder).")
    # --- evaluation extras ---------------------------------------------------------------------
    benchmarks: list[str] = _f([], "Multiple-choice benchmark folders (MMLU/CMMLU layout) scored before vs after by "
                               "`lorafit eval` for forgetting.")
    forgetting_budget: float = _f(0.02, "`lorafit eval --checkpoints --select`: the largest relative rise of the general "
                                  "set's loss over the base that a selected checkpoint may have.")
    # --- resolved at run time (written to the run's config.yaml, ignored on input) -------------
    effective_warmup_steps: int | None = _f(None, "Resolved: warmup steps actually used (see warmup rule).", resolved=True)
    total_steps: int | None = _f(None, "Resolved: optimizer steps of the run.", resolved=True)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str | None = None) -> "TrainConfig":
        """Check every value before anything heavy happens; raise ConfigError naming the field."""

        def bad(name: str, msg: str) -> None:
            raise ConfigError(msg, file=source, line=_LINES.get((source, name)), field=name)

        if not self.model:
            bad("model", "is required (a local folder, a .gguf file or a hub id)")
        if not self.data:
            bad("data", "is required (one training file or a list)")
        positive = {"learning_rate": self.learning_rate, "lora_rank": self.lora_rank,
                    "batch_size": self.batch_size, "num_epochs": self.num_epochs,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "lora_alpha": self.lora_alpha, "eval_steps": self.eval_steps,
                    "logging_steps": self.logging_steps, "save_steps": self.save_steps,
                    "eval_batch_size": self.eval_batch_size, "max_new_tokens": self.max_new_tokens,
                    "save_total_limit": self.save_total_limit, "augment_copies": self.augment_copies,
                    "max_nonfinite_steps": self.max_nonfinite_steps}
        for name, value in positive.items():
            if not value > 0:
                bad(name, f"must be > 0, got {value!r}")
        if self.pack_tokens is not None and self.pack_tokens < 16:
            bad("pack_tokens", f"must be >= 16 (or null for batch_size x max_length), got {self.pack_tokens!r}")
        if self.max_length < 16:
            bad("max_length", f"must be >= 16, got {self.max_length}")
        for name in ("lora_dropout", "warmup_ratio", "general_ratio", "min_lr_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0 or (name == "min_lr_ratio" and v > 1):
                bad(name, f"must be in [0, 1), got {v!r}")
        for name in ("warmup_steps", "early_stopping_patience"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "l2_penalty", "max_grad_norm", "val_size"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)!r}")
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            bad("val_size", "must be a share in (0, 1) or a whole number of examples")
        if self.lr_scheduler not in SCHEDULERS:
            bad("lr_scheduler", f"must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.format not in FORMATS:
            bad("format", f"unknown format {self.format!r}; expected one of {FORMATS}")
        if self.metric_mode not in METRIC_MODES:
            bad("metric_mode", f"must be one of {METRIC_MODES}, got {self.metric_mode!r}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.template not in ("auto", "chatml"):
            bad("template", f"unknown template {self.template!r}; expected 'auto' or 'chatml'")
        for a in self.augment:
            if a not in AUGMENTATIONS:
                bad("augment", f"unknown augmentation {a!r}; expected some of {AUGMENTATIONS[1:]}")
        if self.general_ratio > 0 and not self.general_data:
            bad("general_ratio", "is > 0 but general_data lists no files")
        if self.distributed not in ("auto", "ddp", "fsdp"):
            bad("distributed", f"must be auto, ddp or fsdp, got {self.distributed!r}")
        if self.distributed == "fsdp" and self.fused_kernels:
            bad("fused_kernels", "is not supported with distributed: fsdp (set one of them differently)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self

    def resolve_warmup(self, total_steps: int) -> int:
        """The documented rule: the larger of warmup_steps and ceil(ratio*total), capped at total."""
        return min(total_steps, max(self.warmup_steps, math.ceil(self.warmup_ratio * total_steps)))


FIELDS = {f.name: f for f in fields(TrainConfig)}
# (file, key) -> line of that key in the YAML, so validation errors can name the line.
_LINES: dict[tuple[str | None, str], int] = {}


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(name: str, value: Any, source: str | None, line: int | None) -> Any:
    """Turn YAML/CLI values into the field's declared type, or raise naming the field."""
    ftype = str(FIELDS[name].type)
    try:
        if value is None:
            return None if "None" in ftype else _type_error()
        if ftype == "list[str] | str":
            if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                return value
            return _type_error()
        if ftype.startswith("list"):
            if isinstance(value, str):
                value = [value] if name != "augment" or value else []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return _type_error()
            return list(value)
        if ftype.startswith("dict"):
            if not isinstance(value, dict):
                return _type_error()
            return {str(k): str(v) for k, v in value.items()}
        if ftype == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            return _type_error()
        if ftype.startswith("int"):
            if isinstance(value, bool):
                return _type_error()
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(value) if isinstance(value, (int, str)) else _type_error()
        if ftype.startswith("float"):
            if isinstance(value, bool):
                return _type_error()
            return float(value)
        if ftype.startswith("str"):
            return str(value) if isinstance(value, (str, int, float)) else _type_error()
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"expected {ftype}, got {value!r} ({type(value).__name__})",
                      file=source, line=line, field=name) from None


def _type_error() -> Any:
    raise TypeError


def _yaml_key_lines(text: str) -> dict[str, int]:
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def parse_override(item: str) -> tuple[str, Any]:
    if not item.startswith("--") or "=" not in item:
        raise ConfigError(f"override {item!r} must look like --key=value (dotted keys reach into mappings)")
    key, raw = item[2:].split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.replace("-", "_") if key.replace("-", "_") in FIELDS else key, value


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                **kwargs: Any) -> TrainConfig:
    """Load a YAML config, apply ``--key=value`` overrides (or a dict / kwargs), validate it.

    Relative data and model paths are resolved against the YAML file's folder, so a config can be
    run from anywhere.
    """
    raw: dict[str, Any] = {}
    source = None if path is None else str(path)
    lines: dict[str, int] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config file not found", file=source)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"not UTF-8 text (byte {e.start})", file=source) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(f"invalid YAML: {getattr(e, 'problem', e)}", file=source,
                              line=None if mark is None else mark.line + 1) from None
        if loaded is None:
            raise ConfigError("config file is empty", file=source)
        if not isinstance(loaded, dict):
            raise ConfigError("config must be a mapping of key: value", file=source, line=1)
        raw = loaded
        lines = _yaml_key_lines(text)
        base = p.parent
    else:
        base = Path.cwd()

    items: list[tuple[str, Any, str | None]] = [(k, v, source) for k, v in raw.items()]
    if isinstance(overrides, dict):
        items += [(k, v, "override") for k, v in overrides.items()]
    elif overrides:
        items += [(*parse_override(o), "override") for o in overrides]
    items += [(k, v, "argument") for k, v in kwargs.items()]

    values: dict[str, Any] = {}
    for key, value, where in items:
        key = str(key)
        top, _, sub = key.partition(".")
        line = lines.get(top) if where == source else None
        if top not in FIELDS:
            raise ConfigError(f"unknown config key '{top}'{_suggest(top)}", file=where, line=line, field=top)
        if FIELDS[top].metadata.get("resolved"):
            continue  # resolved values of an earlier run are recomputed, never trusted
        if sub:
            if not str(FIELDS[top].type).startswith("dict"):
                raise ConfigError(f"'{top}' is not a mapping; cannot set '{key}'", file=where, field=key)
            current = dict(values.get(top, FIELDS[top].default_factory()))  # type: ignore[misc]
            current[sub] = value
            value = current
        if where == source:
            _LINES[(source, top)] = line or 0
        values[top] = _coerce(top, value, where, line)

    cfg = TrainConfig(**values)
    cfg = _resolve_paths(cfg, base)
    return cfg.validate(source)


def _resolve_paths(cfg: TrainConfig, base: Path) -> TrainConfig:
    def fix(p: str) -> str:
        if not p or "://" in p:
            return p
        q = Path(p).expanduser()
        cand = q if q.is_absolute() else base / q
        # Keep hub ids (org/name) as they are when no such local path exists.
        return str(cand.resolve()) if cand.exists() or p.endswith((".json", ".jsonl", ".csv", ".gguf")) else p

    return dataclasses.replace(
        cfg,
        model=fix(cfg.model),
        output_dir=str((base / Path(cfg.output_dir).expanduser()).resolve()),
        data=[_fix_keep_fragment(fix, d) for d in cfg.data],
        val_data={k: _fix_keep_fragment(fix, v) for k, v in cfg.val_data.items()},
        general_eval=None if cfg.general_eval is None else fix(cfg.general_eval),
        general_data=[fix(d) for d in cfg.general_data],
    )


def _fix_keep_fragment(fix: Any, p: str) -> str:
    path, hash_, frag = p.partition("#")
    return fix(path) + hash_ + frag


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)  # never a half-written config next to a checkpoint


def config_help() -> str:
    """Help text for every key, generated from the schema."""
    out = []
    for f in fields(TrainConfig):
        if f.metadata.get("resolved"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(f"  {f.name} (default {default!r}): {f.metadata['help']}")
    return "\n".join(out)
