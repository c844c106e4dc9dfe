"""The run folder, the contract between commands (docs/run-folder.md, checked against this module by
tests/unit/test_rundir.py): the layout's names, the builders of every `log.jsonl` record, reading a
run's config (`run_config_path`, the one "not a run folder" error; `read_config`), the lock, and the
output folder and resume rules: lorafit writes only into its own run folders, never over one of
its inputs, and resumes a run only with the config the run was started with. `lorafit train` writes
through it; eval, diagnose, report, generate and merge read through it.

Why the rules: `lorafit train` rewrites `config.yaml` and `log.jsonl`, replaces `adapter/` and prunes
`checkpoints/` in its output folder. Pointed at a folder of the user's own files (or at a folder that
holds its own training data or config) that destroys them; resumed with another config it would
silently continue a different run than the one its checkpoints belong to. docs/reliability.md
states the rules; `training/loop.py` calls `guard_output_dir` and `check_resume` before anything is
written, and `mark_run_dir` when it creates the folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .config import FIELDS, TrainConfig, load_config
from .errors import ConfigError, RunError
from .safeyaml import load as load_yaml
from .safeyaml import short

# --- the layout: every name in a run folder, relative to it (docs/run-folder.md, checked by tests/unit/test_rundir.py)
MARKER = ".lorafit-run"
"""Written into every run folder lorafit creates: the folder is lorafit's to write and prune."""
LOCK = ".lock"                    # held (flock) while `lorafit train` runs
CONFIG = "config.yaml"            # the resolved TrainConfig
LOG = "log.jsonl"                 # one record a line: train_record, eval_record, event (below)
ADAPTER = "adapter"               # the final PEFT adapter
BEST_ADAPTER = "best-adapter"     # early stopping's best adapter while training runs; renamed to ADAPTER at the end
CHECKPOINTS = "checkpoints"       # CHECKPOINTS/step-N/, see the CKPT_* names
LOSS_PLOT = "loss.png"
EVAL_DIR = "eval"                 # what `lorafit eval` writes, see the names below
SELECTED_ADAPTER = "selected-adapter"   # `lorafit eval --select`'s choice, PEFT format, plus SELECTED_CHOICE
DIAGNOSIS = "diagnosis.json"
REPORT_HTML, REPORT_MD = "report.html", "report.md"
TENSORBOARD, WANDB, MLFLOW = "tb", "wandb", "mlflow.db"   # tracker mirrors (report_to)

# inside EVAL_DIR (and inside the --out folder of `lorafit eval --adapter`, which has the same files)
METRICS_JSON, METRICS_MD = "metrics.json", "metrics.md"
CHECKPOINTS_JSON, CHECKPOINTS_MD, CHECKPOINTS_PNG = "checkpoints.json", "checkpoints.md", "checkpoints.png"
# inside SELECTED_ADAPTER
SELECTED_CHOICE = "selected.json"
# inside CHECKPOINTS: one folder STEP_PREFIX + str(step) per checkpoint, holding
STEP_PREFIX = "step-"
CKPT_WEIGHTS, CKPT_OPTIMIZER, CKPT_RNG = "trainable.safetensors", "optimizer.pt", "rng.pt"
CKPT_STATE, CKPT_MANIFEST = "state.json", "manifest.json"   # the manifest is written last

RUN_ENTRIES = (MARKER, LOCK, CONFIG, LOG, ADAPTER, BEST_ADAPTER, CHECKPOINTS, LOSS_PLOT, EVAL_DIR, SELECTED_ADAPTER,
               DIAGNOSIS, REPORT_HTML, REPORT_MD, TENSORBOARD, WANDB, MLFLOW)
EVAL_FILES = (METRICS_JSON, METRICS_MD, CHECKPOINTS_JSON, CHECKPOINTS_MD, CHECKPOINTS_PNG)  # + predictions, benchmarks
CHECKPOINT_FILES = (CKPT_WEIGHTS, CKPT_OPTIMIZER, CKPT_RNG, CKPT_STATE, CKPT_MANIFEST)


def file_part(name: str) -> str:
    """A set or benchmark name as a file-name part (val_data keys are free text)."""
    return re.sub(r"[^\w.-]", "_", name)


def predictions_name(model: str, set_name: str) -> str:
    """`predictions-<model>-<set>.jsonl` in EVAL_DIR; `model` is "base" or "tuned"."""
    return f"predictions-{model}-{file_part(set_name)}.jsonl"


def benchmark_name(bench: str, shots: int) -> str:
    """`benchmark-<name>-<k>shot.jsonl` in EVAL_DIR."""
    return f"benchmark-{bench}-{shots}shot.jsonl"


# --- log.jsonl's records: the trainer writes them only through these builders
TYPE_TRAIN, TYPE_EVAL, TYPE_EVENT = "train", "eval", "event"
RECORD_TYPES = (TYPE_TRAIN, TYPE_EVAL, TYPE_EVENT)
START, RESUME, NONFINITE_SKIP, DIVERGED, EARLY_STOP, END = (
    "start", "resume", "nonfinite_skip", "diverged", "early_stop", "end")

RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    TYPE_TRAIN: ("type", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"),
    TYPE_EVAL: ("type", "step", "split", "eval_loss"),
    TYPE_EVENT: ("type", "step", "event"),
}
"""Every record type and the fields each carries (an event adds EVENT_FIELDS[its name])."""

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    START: ("total_steps", "effective_warmup_steps", "train_examples", "general_examples", "truncated_examples",
            "val_sets", "world_size", "global_batch_size", "learning_rate", "distributed", "device",
            "micro_batches_per_epoch", "packing", "fused_kernels", "step_kind", "step_fallback", "fp8_copies_gib", "fp8_offloaded_gib"),
    RESUME: ("checkpoint", "world_size"),
    NONFINITE_SKIP: ("loss", "grad_norm", "consecutive"),
    DIVERGED: ("reason",),
    EARLY_STOP: ("best_step", "best_loss"),
    END: ("best_step", "best_loss", "final_eval", "peak_memory_gib", "graphs"),
}
"""Every event the trainer logs and its fields; the OPTIONAL ones appear only where they apply."""
OPTIONAL_FIELDS = frozenset({"step_fallback", "peak_memory_gib", "graphs", "fp8_copies_gib", "fp8_offloaded_gib"})
EVENTS = tuple(EVENT_FIELDS)


def train_record(step: int, epoch: float, loss: float, lr: float, grad_norm: float,
                 tokens_per_s: float) -> dict[str, Any]:
    """Every `logging_steps` optimizer steps; `loss` is the mean since the previous train record."""
    return {"type": TYPE_TRAIN, "step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": round(tokens_per_s, 1)}


def eval_record(step: int, split: str, eval_loss: float) -> dict[str, Any]:
    """One validation set's loss at `step`."""
    return {"type": TYPE_EVAL, "step": step, "split": split, "eval_loss": eval_loss}


def event(step: int, name: str, **fields: Any) -> dict[str, Any]:
    """An event record; `name` and `fields` must be those EVENT_FIELDS declares (a programming error
    otherwise: the log's shape is the contract docs/run-folder.md states)."""
    if name not in EVENT_FIELDS:
        raise ValueError(f"unknown log event {name!r}; declare it in rundir.EVENT_FIELDS and docs/run-folder.md")
    declared = EVENT_FIELDS[name]
    unknown = set(fields) - set(declared)
    missing = set(declared) - OPTIONAL_FIELDS - set(fields)
    if unknown or missing:
        raise ValueError(f"event {name!r}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    return {"type": TYPE_EVENT, "step": step, "event": name, **fields}

RESUMABLE_KEYS: frozenset[str] = frozenset({
    # when to stop, evaluate, log and checkpoint: the weights' trajectory up to any step is unchanged
    "max_steps", "eval_steps", "logging_steps", "save_steps", "save_total_limit", "max_nonfinite_steps",
    # evaluation only: what is measured, not what is trained
    "eval_batch_size", "max_eval_samples", "max_new_tokens", "metric_mode", "benchmarks", "forgetting_budget",
    # where and how the same computation runs (checkpoints are independent of the process count)
    "device", "dist_timeout", "distributed", "gradient_checkpointing", "report_to",
    # how the step runs: the fused kernels and the graph step compute the same update (up to float noise
    # and which dropout masks are drawn); a run started before `auto` became the default resumes unchanged
    "fused_kernels", "cuda_graph",
    # the folder itself: it may have been moved since the run started
    "output_dir",
})
"""Config keys that may differ between a run's saved config.yaml and a resumed invocation.

Everything else -- the data, model, LoRA shape, optimiser and schedule, batch sizes, seed -- defines
the run its checkpoints belong to, so a difference is refused with a diff. One exception, checked
here: `gradient_accumulation_steps` may change when the run's saved `global_batch_size` is kept
(resuming on another number of processes)."""

_DATA_KEYS = ("data", "val_data", "general_eval", "general_data", "benchmarks", "model")


def _lock_only(path: Path) -> bool:
    """An empty `.lock` is what a killed `lorafit train` can leave in a folder it had just created."""
    return path.name == LOCK and path.is_file() and path.stat().st_size == 0


def is_run_dir(path: Path) -> bool:
    """True for a folder lorafit wrote: it holds MARKER, or (runs from before the marker) a
    config.yaml that is a lorafit config and a log.jsonl whose first record is lorafit's start event."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    try:
        cfg, _ = load_yaml((path / CONFIG).read_text(encoding="utf-8"))
        with open(path / LOG, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError, ConfigError):
        return False
    return (isinstance(cfg, dict) and {"model", "data", "output_dir"} <= set(cfg)
            and all(isinstance(k, str) and k in FIELDS for k in cfg)
            and isinstance(first, dict) and first.get("type") == TYPE_EVENT and first.get("event") == START)


def _inputs(cfg: TrainConfig, config_path: str | Path | None) -> list[tuple[str, Path]]:
    """(config key, local path) of every file or folder the run reads."""
    found: list[tuple[str, str]] = [("data", d) for d in cfg.data]
    found += [(f"val_data.{k}", v) for k, v in cfg.val_data.items()]
    found += [("general_data", d) for d in cfg.general_data] + [("benchmarks", b) for b in cfg.benchmarks]
    if cfg.general_eval:
        found.append(("general_eval", cfg.general_eval))
    if cfg.model and Path(cfg.model).exists():  # a hub id is no local path
        found.append(("model", cfg.model))
    if config_path is not None:
        found.append(("config", str(config_path)))
    return [(key, Path(p.partition("#")[0]).expanduser().resolve()) for key, p in found if p and "://" not in p]


def guard_output_dir(cfg: TrainConfig, config_path: str | Path | None = None) -> None:
    """Refuse (ConfigError, exit 2) an output folder lorafit must not write; writes nothing.

    Refused: a folder that exists, is not empty and is not a lorafit run folder (`is_run_dir`), and
    any input -- data, validation sets, general sets, benchmarks, a local model, the config file --
    that lies inside the output folder or is it.
    """
    out = Path(cfg.output_dir).expanduser().resolve()
    for key, p in _inputs(cfg, config_path):
        if p == out or out in p.parents:
            raise ConfigError(f"the output folder {'is' if p == out else 'holds'} the run's input {key} ({p}): "
                              "training would write over it; choose another output_dir", file=str(out),
                              field="output_dir")
    if not out.is_dir():
        return
    entries = [e for e in out.iterdir() if not _lock_only(e)]
    if entries and not is_run_dir(out):
        names = ", ".join(sorted(e.name for e in entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"folder is not empty ({names}) and is not a lorafit run folder (no {MARKER}); lorafit "
                          "writes only into a new or empty folder or its own run: choose another output_dir",
                          file=str(out), field="output_dir")


def mark_run_dir(out: Path) -> None:
    """Create the run folder and its MARKER (atomically: a temporary file renamed); idempotent."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if marker.is_file():
        return
    tmp = out / f".{MARKER}.{os.getpid()}.tmp"
    tmp.write_text("lorafit run folder: lorafit writes here and deletes only what it wrote "
                   "(docs/reliability.md)\n", encoding="utf-8")
    os.replace(tmp, marker)


def _norm(v: Any) -> Any:
    """Values as YAML round-trips them: 32 == 32.0, tuples as lists, mapping values as strings."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {str(k): str(x) for k, x in v.items()}
    return v


def _default(name: str) -> Any:
    f = FIELDS[name]
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


# Keys added after runs were saved: the value that reproduces what a run saved without the key did.
SAVED_BEFORE_THE_KEY = {"balance_steps": 0}  # before session 8 each step kept the shuffle's examples


def _no_effect(name: str, saved: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether a difference in `name` cannot change this run: balance_steps deals nothing with one micro-batch
    a step, one example a micro-batch, or packing."""
    if name != "balance_steps":
        return False
    from .data.batches import deals

    per_step = (saved.get("global_batch_size") or 0) // max(cfg.batch_size, 1)
    return not deals(cfg.batch_size, per_step, 1, cfg.packing)


def _accumulation_ok(saved: dict[str, Any], cfg: TrainConfig) -> bool:
    """gradient_accumulation_steps may change only where the saved global batch is kept."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return saved.get("global_batch_size") == cfg.batch_size * cfg.gradient_accumulation_steps * world


def check_resume(cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume (ConfigError, exit 2) with a config that differs from the run's saved one.

    Compared: every key but RESUMABLE_KEYS and resolved keys (effective_warmup_steps, total_steps,
    ...). A key the saved config lacks (added by a newer lorafit) counts as its default. The message
    lists "key: saved -> requested" for each difference.
    """
    path = Path(out) / CONFIG
    if not path.is_file():
        return
    try:
        saved, _ = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"the run's config cannot be read ({e}); cannot check the resume", file=str(path)) from None
    except ConfigError as e:
        raise ConfigError(f"the run's config is invalid ({e.message}); cannot check the resume", file=str(path),
                          line=e.line, field=e.field) from None
    if not isinstance(saved, dict):
        raise ConfigError("the run's config is not a mapping; cannot check the resume", file=str(path))
    diffs = []
    for name, f in FIELDS.items():
        if f.metadata.get("resolved") or name in RESUMABLE_KEYS:
            continue
        before = saved.get(name, SAVED_BEFORE_THE_KEY.get(name, _default(name)))
        now = getattr(cfg, name)
        if _norm(before) == _norm(now) or _no_effect(name, saved, cfg):
            continue
        if name == "gradient_accumulation_steps" and _accumulation_ok(saved, cfg):
            continue
        diffs.append(f"{name}: {short(before)} -> {short(now)}")
    if diffs:
        raise ConfigError(f"resuming with a different config: {'; '.join(diffs)}. Only these keys may change on "
                          f"resume: {', '.join(sorted(RESUMABLE_KEYS))} (docs/reliability.md); set the others back "
                          "or train into a new output_dir", file=str(path), field=diffs[0].split(":")[0])


def check_global_batch(cfg: TrainConfig, plan: Any) -> None:
    """A run resumed on another number of processes must keep its global batch: the LR schedule, the
    step count and the data order all assume it (`plan`: the trainer's resolved Plan)."""
    import yaml

    out = Path(cfg.output_dir)
    p = out / CONFIG
    if not (out / CHECKPOINTS).is_dir() or not p.is_file():
        return
    try:
        saved = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("global_batch_size")
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return  # check_resume reports an unreadable config
    if saved is not None and saved != plan.global_batch_size:
        raise ConfigError(f"this run was started with a global batch of {saved}; {cfg.batch_size} per device x "
                          f"{cfg.gradient_accumulation_steps} accumulation x {plan.world_size} processes is "
                          f"{plan.global_batch_size}: set gradient_accumulation_steps so the product is {saved}",
                          file=str(p), field="gradient_accumulation_steps")


def run_config_path(run: str | Path) -> Path:
    """The `config.yaml` of a run folder that `lorafit train` wrote; the one "not a run folder" check that
    generate, merge, eval and the API share."""
    p = Path(run) / CONFIG
    if not p.is_file():
        raise RunError("not a run folder (no config.yaml); pass the output_dir of `lorafit train`", file=str(run))
    return p


def read_config(run: str | Path) -> TrainConfig:
    """The run's resolved config (RunError for a folder that is not a run, ConfigError for a bad config)."""
    return load_config(run_config_path(run))


def finished(run_dir: Path) -> bool:
    """The run ended: it has its log, its final adapter, and an `end` event among the last records."""
    p = run_dir / LOG
    if not (p.is_file() and (run_dir / ADAPTER / "adapter_config.json").is_file()):
        return False
    for ln in p.read_text(encoding="utf-8").splitlines()[-3:]:
        try:
            if json.loads(ln).get("event") == END:
                return True
        except ValueError:
            pass
    return False


def check_output_dir(out: Path) -> None:
    """Fail before anything is written if the output folder cannot be created or written."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{probe} is not a folder", file=str(out), field="output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("output folder is not writable", file=str(out), field="output_dir")
    # os.access only reads mode bits: root passes it even where nothing can be created (/proc, /sys,
    # read-only mounts), so try for real with a probe file that is removed at once.
    try:
        fd, name = tempfile.mkstemp(prefix=".lorafit-probe-", dir=probe)
    except OSError as e:
        raise ConfigError(f"output folder cannot be created in {probe} ({e.strerror})", file=str(out),
                          field="output_dir") from None
    os.close(fd)
    os.unlink(name)


class FolderLock:
    """An exclusive lock on the run folder for the life of the run.

    Two `lorafit train` processes writing one folder would interleave log lines and checkpoints; the
    second is refused instead. The flock dies with its process (kill -9 included); `release` (called on
    every exit path, the watchdog's included) also removes the `.lock` file, but only by its holder.
    """

    def __init__(self, out: Path) -> None:
        import fcntl

        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOCK
        self.f: Any = open(self.path, "a+")
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            self.f = None
            raise ConfigError("output folder is in use by another `lorafit train`", file=str(out),
                              field="output_dir") from None

    def release(self) -> None:
        if self.f is not None:
            self.path.unlink(missing_ok=True)
            self.f.close()
            self.f = None


def lock_output_dir(out: Path) -> Any:
    """The run folder's lock (kept for callers of the earlier API: returns the open, locked file)."""
    return FolderLock(out).f
