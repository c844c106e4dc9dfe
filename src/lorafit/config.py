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
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .safeyaml import load as load_yaml
from .safeyaml import short

SCHEDULERS = ("cosine", "linear", "inverse_sqrt", "constant")
FORMATS = ("auto", "alpaca", "sharegpt", "text")
METRIC_MODES = ("llamafactory", "standard")
DTYPES = ("auto", "float32", "bfloat16", "float16")
AUGMENTATIONS = ("none", "prompt_variants", "word_dropout", "swap_adjacent")
TRACKERS = ("tensorboard", "wandb", "mlflow")
QUANTIZE_BASE = ("none", "fp8")


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
    balance_steps: int = _f(8, "With several micro-batches a step (gradient accumulation or several processes), batch_size "
                            ">= 2 and no packing: the examples of this many consecutive optimizer steps are dealt into "
                            "micro-batches of near-equal tokens (at most batch_size examples each), shuffled over those "
                            "steps, so processes finish their share of a step together. Changes which examples share a "
                            "step, never how often one is seen an epoch; 0: the shuffle's micro-batches as they are "
                            "(docs/distributed.md).")
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
    fused_kernels: bool | str = _f("auto", "lorafit's fused LoRA, norm, rotary, SwiGLU and cross-entropy kernels: 'auto' "
                                   "(default) turns them on where CUDA and Triton run (then LoRA dropout is drawn inside "
                                   "the fused products from (seed, micro-batch)) and off elsewhere (CPU: nothing changes); "
                                   "true / false force it. Covers Llama, Qwen2, Qwen3 and Mistral; other architectures train on their own "
                                   "modules and loss (the start event says so).")
    quantize_base: str | None = _f("none", "Frozen base weights in the fused LoRA products' GEMMs: 'none' or null (the model dtype) or "
                            "'fp8' (e4m3 copies with row-wise scales, activations quantized per token; on an H200 an 8B model's "
                            "full 2x1024 steps run 1.24x faster; SmolLM2-135M's run no faster). A different computation, like "
                            "QLoRA's quantized base: the adapter trains against the quantized base (its loss is "
                            "measured beside bf16's in docs/speed.md). Needs the fused kernels and a GPU with FP8 "
                            "tensor cores (compute capability 8.9+). In one process the copied bf16 weights wait in host memory, "
                            "so the copies cost no GPU memory.")
    cuda_graph: bool | str = _f("auto", "With fused kernels: each micro-batch's examples (a padded batch's rows, or a "
                                "pack) run as one padding-free row filled to a length bucket (a multiple of 128; rows of one "
                                "length that fill it exactly stay rows), its forward and backward replayed from a CUDA "
                                "graph captured once per bucket, with the gradient all-reduce inside it under several "
                                "processes; clipping and the (device-guarded) optimizer step run after it. 'auto': on CUDA where the step "
                                "allows it (not with FSDP, DoRA or gradient checkpointing); true: also on CPU, without "
                                "capture (the same step, for tests); false: off.")
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
    global_batch_size: int | None = _f(None, "Resolved: examples per optimizer step (batch_size x "
                                       "gradient_accumulation_steps x processes).", resolved=True)
    world_size: int | None = _f(None, "Resolved: number of processes the run was started with.", resolved=True)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str | None = None, origins: dict[str, str | None] | None = None) -> "TrainConfig":
        """Check every value before anything heavy happens; raise ConfigError naming the field, and the file
        and line it came from, or the override (`origins`: where each key was last set)."""

        def bad(name: str, msg: str) -> None:
            where = (origins or {}).get(name, source)
            raise ConfigError(msg, file=where, line=_LINES.get((source, name)) if where == source else None, field=name)

        if not self.model:
            bad("model", "is required (a local folder, a .gguf file or a hub id)")
        if not self.data:
            bad("data", "is required (one training file or a list)")
        for name in NUMERIC:
            problem = _out_of_range(name, getattr(self, name))
            if problem:
                bad(name, problem)
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            bad("val_size", "must be a share in (0, 1) or a whole number of examples")
        for name, allowed in (("report_to", TRACKERS),):
            unknown = [v for v in getattr(self, name) if v not in allowed]
            if unknown:
                bad(name, f"unknown {short(unknown[0])}; expected some of {allowed}")
        for name in ("benchmarks", "general_data", "data"):
            if any(not v.strip() or "\0" in v for v in getattr(self, name)):
                bad(name, "holds an empty path or a NUL byte")
        if isinstance(self.target_modules, list) and (not self.target_modules or not all(
                m.strip() for m in self.target_modules)):
            bad("target_modules", "must be 'all-linear' or a non-empty list of module names "
                "(checked against the model when it loads)")
        if self.lr_scheduler not in SCHEDULERS:
            bad("lr_scheduler", f"must be one of {SCHEDULERS}, got {short(self.lr_scheduler)}")
        if self.format not in FORMATS:
            bad("format", f"unknown format {short(self.format)}; expected one of {FORMATS}")
        if self.metric_mode not in METRIC_MODES:
            bad("metric_mode", f"must be one of {METRIC_MODES}, got {short(self.metric_mode)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}, got {short(self.dtype)}")
        if self.template not in ("auto", "chatml"):
            bad("template", f"unknown template {short(self.template)}; expected 'auto' or 'chatml'")
        for a in self.augment:
            if a not in AUGMENTATIONS:
                bad("augment", f"unknown augmentation {short(a)}; expected some of {AUGMENTATIONS[1:]}")
        if self.general_ratio > 0 and not self.general_data:
            bad("general_ratio", "is > 0 but general_data lists no files")
        if self.quantize_base is None:  # `quantize_base: null` (LLaMA-Factory's way to say "no quantization")
            self.quantize_base = "none"
        if self.quantize_base not in QUANTIZE_BASE:
            bad("quantize_base", f"must be one of {QUANTIZE_BASE}, got {short(self.quantize_base)}")
        if self.quantize_base == "fp8" and self.fused_kernels is False:
            bad("quantize_base", "fp8 runs inside lorafit's fused kernels; it needs fused_kernels: auto or true")
        if self.quantize_base == "fp8" and self.distributed == "fsdp":
            bad("quantize_base", "fp8 runs inside lorafit's fused kernels, which do not run under distributed: fsdp "
                "(use distributed: ddp or auto)")
        if self.distributed not in ("auto", "ddp", "fsdp"):
            bad("distributed", f"must be auto, ddp or fsdp, got {short(self.distributed)}")
        refused = fused_kernels_refused(self.fused_kernels, self.distributed)
        if refused:
            bad("fused_kernels", refused)
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            bad("device", f"must be auto, cpu, cuda or cuda:N, got {short(self.device)}")
        return self

    def resolve_warmup(self, total_steps: int) -> int:
        """The documented rule: the larger of warmup_steps and ceil(ratio*total), capped at total."""
        return min(total_steps, max(self.warmup_steps, math.ceil(self.warmup_ratio * total_steps)))


def fused_kernels_refused(fused_kernels: bool | str, strategy: str) -> str | None:
    """The one FSDP / fused-kernels rule: the fused kernels do not run under FSDP, so `fused_kernels: true`
    there is refused (why, as a message for the field fused_kernels; None where allowed) and `auto`
    resolves to off (training/plan.py `resolve_fused`). `strategy` is the config's `distributed` when the
    config is validated, and the strategy a run chose (`auto` may pick FSDP for a large base) when it starts."""
    if strategy == "fsdp" and fused_kernels is True:
        return "is not supported with distributed: fsdp (set fused_kernels: false or distributed: ddp)"
    return None


FIELDS = {f.name: f for f in fields(TrainConfig)}

# The valid range of every number in the schema (docs/reliability.md lists them): "[lo, hi]" with
# "(" / ")" for an excluded end. "inf" is the type's limit: any finite float, or INT_MAX for an int
# (so every integer fits torch, numpy and YAML; a 5,000-digit one is refused, not carried around).
# Optional counts (None = no limit) and max_steps (-1 = num_epochs decides) are checked when set.
INT_MAX = 2**31 - 1
LORA_RANK_MAX = 16384  # the widest released models' hidden size; model.apply_lora also caps it at the model's
RANGES: dict[str, str] = {
    "val_size": "[0, inf)", "general_ratio": "[0, 1)", "max_length": "[16, inf)", "max_samples": "[1, inf)",
    "augment_copies": "[1, inf)", "lora_rank": f"[1, {LORA_RANK_MAX}]", "lora_alpha": "(0, inf)",
    "lora_dropout": "[0, 1)", "num_epochs": "(0, 1000000]", "max_steps": "[1, inf)", "learning_rate": "(0, inf)",
    "batch_size": "[1, inf)", "gradient_accumulation_steps": "[1, inf)", "min_lr_ratio": "[0, 1)",
    "balance_steps": "[0, inf)",
    "warmup_ratio": "[0, 1)", "warmup_steps": "[0, inf)", "weight_decay": "[0, inf)", "l2_penalty": "[0, inf)",
    "max_grad_norm": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_eps": "(0, inf)",
    "seed": f"[0, {2**32 - 1}]", "max_nonfinite_steps": "[1, inf)", "early_stopping_patience": "[0, inf)",
    "eval_steps": "[1, inf)", "logging_steps": "[1, inf)", "save_steps": "[1, inf)", "save_total_limit": "[1, inf)",
    "eval_batch_size": "[1, inf)", "max_eval_samples": "[1, inf)", "max_new_tokens": "[1, inf)",
    "pack_tokens": "[16, inf)", "dist_timeout": "(0, 31536000]", "forgetting_budget": "[0, inf)",
}
_OR = {"max_steps": " (or -1: num_epochs decides)", "pack_tokens": " (or null for batch_size x max_length)",
       "max_samples": " (or null: all)", "max_eval_samples": " (or null: all)"}
NUMERIC = [f.name for f in fields(TrainConfig) if not f.metadata.get("resolved")
           and str(f.type).split(" |")[0] in ("int", "float")]


def _out_of_range(name: str, value: Any) -> str | None:
    """What is wrong with a number, or None: NaN/inf, then the field's documented range."""
    if value is None or (name == "max_steps" and value == -1):
        return None  # optional counts unset; max_steps -1: num_epochs decides
    is_int = str(FIELDS[name].type).startswith("int")
    if not is_int and not math.isfinite(value):
        return f"must be a finite number, got {short(value)}"
    lo_s, hi_s = RANGES[name][1:-1].split(", ")
    lo_open, hi_open = RANGES[name][0] == "(", RANGES[name][-1] == ")"
    lo = float(lo_s) if not is_int else int(lo_s)
    hi = (INT_MAX if is_int else math.inf) if hi_s == "inf" else (int(hi_s) if is_int else float(hi_s))
    if value < lo or (lo_open and value == lo):
        if hi_s == "inf":
            return f"must be {'>' if lo_open else '>='} {lo_s}, got {short(value)}" + _OR.get(name, "")
        return f"must be in {RANGES[name]}, got {short(value)}"
    if value > hi or (hi_open and value == hi and hi_s != "inf"):  # "inf)" of an int: INT_MAX itself is valid
        if hi_s == "inf":
            return f"must be at most {hi:,}, got {short(value)}"
        return f"must be in {RANGES[name]}, got {short(value)}"
    return None
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
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value.values()):
                return _type_error()
            return {str(k): str(v) for k, v in value.items()}
        if ftype == "bool | str":  # true / false / auto
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("auto", "true", "false", "1", "0", "yes", "no"):
                return "auto" if value.lower() == "auto" else value.lower() in ("true", "1", "yes")
            raise ConfigError(f"expected true, false or auto, got {short(value)}", file=source, line=line, field=name)
        if ftype == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            return _type_error()
        if ftype.startswith("int"):
            if isinstance(value, bool):
                return _type_error()
            if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
                value = float(value)  # "1e3" (YAML 1.1 reads it as a string) counts as 1000
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(value) if isinstance(value, (int, str)) else _type_error()
        if ftype.startswith("float"):
            if isinstance(value, bool):
                return _type_error()
            return float(value)
        if ftype.startswith("str"):
            return str(value) if isinstance(value, (str, int, float)) else _type_error()
    except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**5000), int(inf)
        pass
    raise ConfigError(f"expected {ftype}, got {short(value)} ({type(value).__name__})",
                      file=source, line=line, field=name) from None


def _type_error() -> Any:
    raise TypeError


def parse_override(item: str) -> tuple[str, Any]:
    if not item.startswith("--") or "=" not in item:
        raise ConfigError(f"override {short(item)} must look like --key=value (dotted keys reach into mappings)")
    key, raw = item[2:].split("=", 1)
    try:
        value = load_yaml(raw, source="override")[0] if raw != "" else ""
    except ConfigError as e:
        if not e.message.startswith("invalid YAML:"):
            raise ConfigError(e.message, file="override", field=key) from None  # an alias bomb, a huge int
        value = raw  # not YAML: the text itself (a value with a ':' in it, ...)
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
        loaded, lines = load_yaml(text, source)  # aliases bounded, duplicate keys refused
        if loaded is None:
            raise ConfigError("config file is empty", file=source)
        if not isinstance(loaded, dict):
            raise ConfigError("config must be a mapping of key: value", file=source, line=1)
        raw = loaded
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
    origins: dict[str, str | None] = {}
    for key, value, where in items:
        key = str(key)
        top, _, sub = key.partition(".")
        line = lines.get(top) if where == source else None
        if top not in FIELDS:
            raise ConfigError(f"unknown config key {short(top)}{_suggest(top)}", file=where, line=line,
                              field=short(top)[1:-1])
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
        origins[top] = where

    cfg = TrainConfig(**values)
    cfg = _resolve_paths(cfg, base)
    return cfg.validate(source, origins)


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
        benchmarks=[fix(b) for b in cfg.benchmarks],
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
