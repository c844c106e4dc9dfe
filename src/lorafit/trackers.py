"""Experiment trackers that mirror `log.jsonl`: `report_to: [tensorboard, wandb, mlflow]`.

`log.jsonl` stays the source of truth (diagnose and report read only it); a tracker is a second copy
for people who already watch their runs in one. Each works offline and inside the run folder by
default -- TensorBoard event files in RUN/tb, wandb in offline mode under RUN/wandb (online only when
WANDB_MODE or WANDB_API_KEY says so), MLflow's local SQLite store RUN/mlflow.db (unless
MLFLOW_TRACKING_URI is set) -- so a run on a machine without network is tracked the same way. Each library is imported
only when named; a missing one is a ConfigError naming `report_to` and the pip extra to install,
raised before training starts.

    trackers = Trackers.open(cfg.report_to, run_dir, cfg.to_dict())
    trackers.log({"type": "train", "step": 10, "loss": 2.1, "lr": 1e-4})
    trackers.close()
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .rundir import MLFLOW, TENSORBOARD, TYPE_EVAL, TYPE_TRAIN, WANDB

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "epoch")


def metrics_of(record: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """(step, {name: value}) of a log.jsonl record, as every tracker names it: train/<key>,
    eval/<split>/loss; events and non-numbers carry no metric (None)."""
    step = record.get("step")
    if not isinstance(step, (int, float)) or isinstance(step, bool):
        return None
    out: dict[str, float] = {}
    if record.get("type") == TYPE_TRAIN:
        for k in TRAIN_KEYS:
            v = record.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"train/{k}"] = float(v)
    elif record.get("type") == TYPE_EVAL:
        v = record.get("eval_loss")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"eval/{record.get('split', 'val')}/loss"] = float(v)
    return (int(step), out) if out else None


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """Config values trackers accept as parameters (scalars; lists and mappings as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in config.items()}


def _missing(name: str) -> ConfigError:
    return ConfigError(f"{name} is not installed: pip install 'lorafit[{name}]' (or remove it)", field="report_to")


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.w = SummaryWriter(log_dir=str(run_dir / TENSORBOARD))
        self.w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flat(config).items()), 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)

    def close(self) -> None:
        self.w.close()


class _Wandb:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        online = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        (run_dir / WANDB).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorafit"), name=run_dir.name,
                              dir=str(run_dir), mode=online, config=_flat(config), reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow") from None
        # MLflow 3 put its plain-file store in maintenance mode (it refuses it by default); a SQLite file in
        # the run folder is its offline store now, and MLflow 2 reads it too.
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / MLFLOW).resolve()}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorafit")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        for k, v in _flat(config).items():
            self.client.log_param(self.run_id, k, str(v)[:6000])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, v, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


KINDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}


class Trackers:
    """The trackers named in `report_to`, fed the records written to log.jsonl."""

    def __init__(self, backends: list[Any]) -> None:
        self.backends = backends

    @classmethod
    def open(cls, names: list[str], run_dir: Path, config: dict[str, Any]) -> "Trackers":
        """Start each named tracker (none: a no-op object); an unknown or uninstalled one is a ConfigError."""
        unknown = [n for n in names if n not in KINDS]
        if unknown:
            raise ConfigError(f"unknown tracker {unknown[0]!r}; expected some of {tuple(KINDS)}", field="report_to")
        opened: list[Any] = []
        try:
            for n in dict.fromkeys(names):
                opened.append(KINDS[n](Path(run_dir), config))
        except BaseException:
            for b in opened:
                b.close()
            raise
        return cls(opened)

    def log(self, record: dict[str, Any]) -> None:
        m = metrics_of(record) if self.backends else None
        if m is not None:
            for b in self.backends:
                b.log(*m)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []
