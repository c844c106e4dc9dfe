"""Crash-safe checkpoints: written under a temporary name, fsynced, renamed into place, with a
manifest of sha256 sums written last. A folder without a valid manifest (a kill -9 mid-write, a
bit flip, a truncated file) is skipped with a warning and never loaded.

The on-disk format does not depend on how the run was distributed: under FSDP the sharded LoRA
weights and optimizer moments are gathered to full tensors first (`trainable_state`,
`optimizer_state`, collectives that every rank calls) and sliced back on load, so a checkpoint
written by 2 FSDP processes resumes on 1 process or under DDP, and the other way round.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError
from ..rundir import CKPT_MANIFEST as MANIFEST
from ..rundir import CKPT_OPTIMIZER, CKPT_RNG, CKPT_STATE, CKPT_WEIGHTS
from ..rundir import STEP_PREFIX as PREFIX
from . import dist

_TMP_NAME = re.compile(rf"\.tmp-{PREFIX}\d+-\d+")  # the temporary folder of one checkpoint write


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable (LoRA) weights; under FSDP a collective: call on every rank."""
    return {n: dist.full_tensor(p.detach()).to("cpu").contiguous().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with sharded moments gathered (a collective under FSDP)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: dist.full_tensor(v).to("cpu") if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in sorted(sd["state"].items())}
    return sd


def first_nonfinite(weights: dict[str, torch.Tensor]) -> str | None:
    return next((n for n, t in weights.items() if not torch.isfinite(t).all()), None)


def save_checkpoint(ckpt_root: Path, step: int, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any], keep: int,
                    weights: dict[str, torch.Tensor] | None = None, optim_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step-N` atomically and prune to the last `keep`; never a non-finite weight.

    `weights` / `optim_state` (from `trainable_state` / `optimizer_state`, gathered on every rank
    beforehand) replace reading `model` / `optimizer` here, which under FSDP only rank 0 reaches.
    """
    if weights is None:
        assert model is not None
        weights = trainable_state(model)
    if optim_state is None:
        assert optimizer is not None
        optim_state = optimizer.state_dict()
    bad = first_nonfinite(weights)
    if bad is not None:
        raise TrainingError(f"non-finite values in adapter weight {bad}; refusing to save checkpoint step-{step}")
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step}"
    for stale in ckpt_root.glob(f".tmp-{PREFIX}*"):  # left by a process killed mid-write (one writer: rank 0)
        if _TMP_NAME.fullmatch(stale.name) and stale.is_dir():  # only the names this function writes
            shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    tmp.mkdir()
    save_file(weights, str(tmp / CKPT_WEIGHTS))
    torch.save(optim_state, tmp / CKPT_OPTIMIZER)
    torch.save(rng_state(), tmp / CKPT_RNG)
    (tmp / CKPT_STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    files = {}
    for f in sorted(tmp.iterdir()):
        _fsync_file(f)
        files[f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in [c for c in list_checkpoints(ckpt_root) if (c / MANIFEST).is_file()][:-keep]:
        shutil.rmtree(old, ignore_errors=True)  # pruned: only folders lorafit wrote (they have a manifest)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit():
            found.append(d)
    return sorted(found, key=lambda d: int(d.name[len(PREFIX):]))


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    man = ckpt / MANIFEST
    if not man.is_file():
        return "no manifest (write was interrupted)"
    try:
        files = json.loads(man.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name, meta in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_valid(ckpt_root: Path) -> Path | None:
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warnings.warn(f"skipping damaged checkpoint {ckpt}: {problem}", stacklevel=2)
    return None


def load_checkpoint(ckpt: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank reads the full tensors and keeps its slice where the model is sharded (FSDP)."""
    weights = load_file(str(ckpt / CKPT_WEIGHTS))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} lacks {missing[0]} (different LoRA settings?)")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(dist.shard_like(t.to(params[n].dtype), params[n]))
    optimizer.load_state_dict(torch.load(ckpt / CKPT_OPTIMIZER, map_location="cpu", weights_only=False))
    for group in optimizer.param_groups:  # moments of a sharded parameter: keep this rank's slice
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    st[k] = dist.shard_like(v, p)
    set_rng_state(torch.load(ckpt / CKPT_RNG, weights_only=False))
    return json.loads((ckpt / CKPT_STATE).read_text(encoding="utf-8"))


def save_adapter_atomic(model: Any, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save the PEFT adapter into `out` via a temporary folder and rename, never half-written.

    `state_dict`: the full trainable weights (`trainable_state`) when the model is sharded, since
    PEFT would otherwise read the DTensor shards; the files written are the same either way.
    """
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is None:
        model.save_pretrained(str(tmp), safe_serialization=True)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    for f in tmp.iterdir():
        _fsync_file(f)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)
