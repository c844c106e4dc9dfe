"""Where a run's numbers come from: lorafit's own run folder, a LLaMA-Factory output folder, a
transformers Trainer output or checkpoint folder, or one log file of any of these shapes.

Most runs people want diagnosed were trained with something else, so every source is turned into
lorafit's `log.jsonl` records (`{"type": "train" | "eval" | "event", ...}`) and its config keys,
which is all the detectors read. The shapes, as their writers produce them:

- LLaMA-Factory `trainer_log.jsonl` (`LogCallback.on_log`): `current_steps`, `total_steps`, `loss`,
  `eval_loss`, `predict_loss`, `reward`, `accuracy`, `lr` (`learning_rate` before late 2024),
  `epoch`, `percentage`, `elapsed_time`, `remaining_time`, `throughput`, `total_tokens`; keys whose
  value is None are left out, so a train line has `loss`, an evaluation line `eval_loss`, and the
  progress lines of a predict-only run neither.
- transformers `trainer_state.json` (`TrainerState`): `log_history` entries with `step`, `epoch` and
  `loss`, `grad_norm` (since 4.38), `learning_rate` for training; `eval_loss` or, with several eval
  sets, `eval_<name>_loss`; a final `train_loss`/`train_runtime` entry. `max_steps`, and since 4.40
  `logging_steps`.
- The launch YAML (LLaMA-Factory's, or TrainingArguments keys): mapped onto lorafit's names below,
  with the defaults those tools apply when a key is absent.

Nothing here guesses: no train record is an error naming the file and the shapes it could have had.
"""
from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import rundir as R
from ..errors import RunError
from .records import as_count
from .toolconfig import lorafit_config, tool_config

LORAFIT, LLAMAFACTORY, HF = "lorafit", "llamafactory", "hf_trainer"
TOOL_NAMES = {LORAFIT: "lorafit", LLAMAFACTORY: "LLaMA-Factory", HF: "HF Trainer"}
EXPECTED = ("expected lorafit's log.jsonl ({\"type\": \"train\", \"step\", \"loss\"}), LLaMA-Factory's "
            "trainer_log.jsonl ({\"current_steps\", \"loss\"}) or HF Trainer's trainer_state.json "
            "(log_history with \"step\" and \"loss\")")
_EVAL_KEY = re.compile(r"eval_(?:(.+)_)?loss")
_CHECKPOINT = re.compile(r"checkpoint-([0-9]+)", re.ASCII)   # str.isdigit() also takes '²'


@dataclass
class RunSource:
    """A run's records in lorafit's shape, and the config both as lorafit keys and as the tool wrote it."""

    kind: str                              # LORAFIT | LLAMAFACTORY | HF
    folder: Path                           # where diagnosis.json and the report go
    log_file: Path                         # the file the records were read from
    records: list[dict[str, Any]]
    metrics: dict[str, Any] | None
    config: dict[str, Any]                 # lorafit key names: what the detectors read
    tool_config: dict[str, Any] = field(default_factory=dict)   # the source tool's own keys
    tool_config_file: Path | None = None

    @property
    def tool(self) -> str:
        return TOOL_NAMES[self.kind]


# --- reading files ------------------------------------------------------------------------------
def json_lines(path: Path) -> list[dict[str, Any]]:
    """JSON objects of a JSON-lines file. A partial last line (a run killed mid-write) is skipped;
    a binary or non-UTF-8 file is an error, never an empty log."""
    data = _read_bytes(path)
    if b"\0" in data:
        raise RunError("binary file, not a JSON-lines log", file=str(path),
                       line=data.count(b"\n", 0, data.index(b"\0")) + 1)
    # A BOM (Windows editors) is skipped: left in, it makes the first record unreadable JSON.
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        if b"\n" in data[at:].rstrip(b"\r\n"):   # not just a last line cut inside a character
            raise RunError(f"not UTF-8 text (byte {at})", file=str(path),
                           line=data.count(b"\n", 0, at) + 1) from None
        text = data[bom:data.rfind(b"\n", 0, at) + 1].decode("utf-8")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise RunError("file not found", file=str(path))
    try:
        return path.read_bytes()
    except OSError as e:
        raise RunError(f"cannot read: {e.strerror or e}", file=str(path)) from None


def _read_json(path: Path) -> Any:
    data = _read_bytes(path)
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunError(f"not a JSON file ({type(e).__name__})", file=str(path)) from None


def _optional_json(path: Path) -> dict[str, Any] | None:
    """A side file that only adds detail (eval/metrics.json): unreadable means absent, and so does a
    NaN or infinite number in it (None), which no finding's evidence could carry into diagnosis.json."""
    try:
        data = _read_bytes(path) if path.is_file() else None
        d = None if data is None else json.loads(
            data.decode("utf-8-sig"), parse_constant=lambda _: None,
            parse_float=lambda t: f if math.isfinite(f := float(t)) else None)
    except (RunError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return d if isinstance(d, dict) else None


# --- shapes -> lorafit records ------------------------------------------------------------------
def sniff(rows: list[dict[str, Any]]) -> str | None:
    """Which writer produced these JSON objects (None when none of the known ones did)."""
    if any(r.get("type") in R.RECORD_TYPES for r in rows):
        return LORAFIT
    if any("current_steps" in r for r in rows):
        return LLAMAFACTORY
    if any("step" in r and ("loss" in r or any(_EVAL_KEY.fullmatch(k) for k in r)) for r in rows):
        return HF
    return None


def from_llamafactory(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """trainer_log.jsonl lines -> lorafit records; `eval_loss` is the `val` split (LLaMA-Factory's
    val_size split), progress-only lines (predict runs, the final summary) carry no loss and drop out,
    and so does a line whose `current_steps` is not a step (NaN, Infinity); a `total_steps` that is not
    a count is unknown."""
    out: list[dict[str, Any]] = []
    total = None
    for r in rows:
        step = as_count(r.get("current_steps"))
        if step is None:
            continue
        total = as_count(r.get("total_steps"), positive=True) or total
        if "loss" in r:
            out.append({"type": R.TYPE_TRAIN, "step": step, "loss": r["loss"],
                        "lr": r.get("lr", r.get("learning_rate")), "epoch": r.get("epoch"),
                        "tokens_per_s": r.get("throughput")})
        if "eval_loss" in r:
            out.append(R.eval_record(step, "val", r["eval_loss"]))
    if total:
        out.insert(0, {"type": R.TYPE_EVENT, "step": 0, "event": R.START, "total_steps": total})
    return out


def from_log_history(history: list[Any], state: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """TrainerState.log_history -> lorafit records. `eval_loss` is split `val`, `eval_<name>_loss`
    split `<name>` (Trainer's prefix for a dict of eval datasets). An entry whose step is not a step
    (NaN, Infinity, 1e300) is skipped; a max_steps or logging_steps that is not a count is unknown."""
    out: list[dict[str, Any]] = []
    for e in history:
        step = as_count(e.get("step")) if isinstance(e, dict) else None
        if step is None:
            continue
        if "loss" in e:
            out.append({"type": R.TYPE_TRAIN, "step": step, "loss": e["loss"], "lr": e.get("learning_rate"),
                        "grad_norm": e.get("grad_norm"), "epoch": e.get("epoch")})
        for k, v in e.items():
            m = _EVAL_KEY.fullmatch(k)
            if m:
                out.append(R.eval_record(step, m.group(1) or "val", v))
    start = {}
    for key, name in (("max_steps", "total_steps"), ("logging_steps", "logging_steps")):
        v = as_count((state or {}).get(key), positive=True)
        if v is not None:
            start[name] = v
    if start:
        out.insert(0, {"type": R.TYPE_EVENT, "step": 0, "event": R.START, **start})
    return out


def records_of(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    if kind == LLAMAFACTORY:
        return from_llamafactory(rows)
    if kind == HF:
        return from_log_history(rows)
    return rows


def _state_records(path: Path) -> list[dict[str, Any]]:
    state = _read_json(path)
    if isinstance(state, list):          # log_history saved on its own
        return from_log_history(state)
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise RunError("not a trainer_state.json (no log_history list)", file=str(path), field="log_history")
    return from_log_history(state["log_history"], state)


def _last_train_step(records: list[dict[str, Any]]) -> float:
    return max((as_count(r.get("step")) or 0 for r in records if r.get("type") == R.TYPE_TRAIN), default=-1)


def _latest_checkpoint(folder: Path) -> Path | None:
    cands = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*")
             if (m := _CHECKPOINT.fullmatch(p.name)) and (p / "trainer_state.json").is_file()]
    return max(cands)[1] / "trainer_state.json" if cands else None


# --- finding the source -------------------------------------------------------------------------
def load_source(path: str | Path, config: str | Path | None = None, require_train: bool = True) -> RunSource:
    """The run at PATH (a folder or one log file) in lorafit's shape; `config` is the launch YAML
    (lorafit's config for a lorafit run, LLaMA-Factory's or TrainingArguments keys otherwise).
    Without a single train record it is a RunError naming the file (unless require_train is off)."""
    p = Path(path)
    if not p.exists():
        raise RunError("not found: expected a run folder or a training log file", file=str(p))
    if not p.is_dir() and not p.is_file():
        raise RunError("not a log file or folder (a device, pipe or socket): expected a run folder or a "
                       "training log file", file=str(p))
    kind, log_file, records = _find_log(p)
    folder = p if p.is_dir() else p.parent
    if require_train and not any(r.get("type") == R.TYPE_TRAIN for r in records):
        raise RunError(f"no training records (no line with a step and a loss; a step is a whole number "
                       f"below 2**53, not NaN or Infinity); {EXPECTED}",
                       file=str(log_file))
    metrics = _optional_json(folder / R.EVAL_DIR / R.METRICS_JSON)
    if kind == LORAFIT:
        cfg = lorafit_config(Path(config) if config is not None else folder / R.CONFIG,
                             required=config is not None)
        return RunSource(kind, folder, log_file, records, metrics, cfg)
    cfg_file = Path(config) if config is not None else _tool_config_file(folder, kind)
    raw, cfg = tool_config(cfg_file, records, kind)
    return RunSource(kind, folder, log_file, records, metrics, cfg or {"source": kind}, raw, cfg_file)


def _tool_config_file(folder: Path, kind: str) -> Path | None:
    """LLaMA Board saves the arguments it launched with as training_args.yaml in the output folder."""
    p = folder / "training_args.yaml"
    return p if kind == LLAMAFACTORY and p.is_file() else None


def _find_log(p: Path) -> tuple[str, Path, list[dict[str, Any]]]:
    if p.is_file():
        return _file_log(p)
    if (p / R.LOG).is_file():
        return _file_log(p / R.LOG)
    lf_log = p / "trainer_log.jsonl"
    state = p / "trainer_state.json"
    if not state.is_file():
        state = _latest_checkpoint(p) or state
    if lf_log.is_file() or (p / "training_args.yaml").is_file() or (p / "llamaboard_config.yaml").is_file():
        # LLaMA-Factory: trainer_log.jsonl is written as training goes; trainer_state.json (root: at
        # the end, checkpoint-N: at each save) adds grad_norm and named eval sets. Use the one that
        # reaches further, trainer_state.json on a tie.
        lf = from_llamafactory(json_lines(lf_log)) if lf_log.is_file() else []
        st = _state_records(state) if state.is_file() else []
        if st and _last_train_step(st) >= _last_train_step(lf):
            return LLAMAFACTORY, state, st
        if lf_log.is_file():
            return LLAMAFACTORY, lf_log, lf
    if state.is_file():
        return HF, state, _state_records(state)
    raise RunError(f"no training log in this folder; {EXPECTED} (HF also in checkpoint-N/)", file=str(p))


def _file_log(p: Path) -> tuple[str, Path, list[dict[str, Any]]]:
    if p.suffix == ".json":
        return HF, p, _state_records(p)
    rows = json_lines(p)
    kind = sniff(rows)
    if kind is None:   # nothing of a known shape: an empty lorafit log (load_source says what was expected)
        return LORAFIT, p, []
    return kind, p, records_of(rows, kind)

