"""The training loop, readable top to bottom: setup, resume, train with periodic evaluation and
checkpoints, save. Stateless data order and LR (both pure functions of the step) make resume exact.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as D
from ..config import TrainConfig, save_config
from ..errors import ConfigError, TrainingError
from ..model import apply_lora, assert_finite, load_model, load_tokenizer, pick_device, pick_dtype
from . import checkpoint as C
from . import dist
from .batches import PackedStream, Stream, batch_tokens
from .schedule import lr_at

log = logging.getLogger("lorafit")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_eval: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    resumed_from: int | None = None


def _check_seeded_dropout_size(cfg: TrainConfig, model_config: Any) -> None:
    """The seeded dropout hashes 32-bit element offsets: refuse, before anything is written, micro-batches
    whose widest LoRA input (tokens x intermediate size) would reach 2^31 elements."""
    tokens = max(cfg.pack_tokens or cfg.batch_size * cfg.max_length, cfg.max_length) if cfg.packing \
        else cfg.batch_size * cfg.max_length
    width = max(getattr(model_config, "intermediate_size", 0) or 0, getattr(model_config, "hidden_size", 0) or 0)
    if tokens * width >= 2 ** 31:
        field = "pack_tokens" if cfg.packing else "batch_size"
        raise ConfigError(f"{tokens} tokens per micro-batch x {width} features reach 2^31 elements, more than "
                          "fused_kernels' seeded dropout takes; use smaller micro-batches", field=field)


class FusedLoss(torch.nn.Module):
    """The model with lorafit's fused loss as its forward.

    DDP and FSDP hook the *wrapper's* forward (DDP prepares its gradient reduction there, FSDP gathers
    the root's shards), so the fused loss, which runs the decoder itself, must be that forward: the
    trainer wraps this module, never the bare model, when fused_kernels is on.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fused_batch: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> Any:
        if fused_batch is None:  # plain calls (evaluation) reach the model unchanged
            return self.model(**kwargs)
        from ..kernels import causal_lm_loss

        return causal_lm_loss(self.model, fused_batch, num_items_in_batch=1)


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
             fused: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised tokens (callers normalise), and token count."""
    if fused:  # chunked fused cross-entropy (model is a FusedLoss, maybe wrapped): no full float32 logits
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return model(fused_batch=b), int((b["labels"][:, 1:] != -100).sum())
    # Padded: input_ids + attention_mask. Packed (`pack_batch`): input_ids + position_ids, which restart
    # per example, so transformers builds a block-diagonal mask; the varlen keys are for flash kernels.
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"].to(device)
    logits = model(**inputs, use_cache=False).logits  # no KV cache (with one, HF would not see the packing)
    shift = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), shift.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((shift != -100).sum())


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, enc: D.Encoded, batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean token loss on a validation set, sharded over ranks and summed."""
    was_training = model.training
    model.eval()
    rank, _, ws = dist.world()
    total, count = 0.0, 0
    order = sorted(range(len(enc.input_ids)), key=lambda i: len(enc.input_ids[i]))  # less padding
    starts = list(range(rank * batch_size, len(order), batch_size * ws))
    # FSDP's forward is a collective: a rank with fewer batches runs dummies (loss discarded).
    rounds = len(range(0, len(order), batch_size * ws)) if dist.is_sharded(model) else len(starts)
    for j in range(rounds):
        idx = order[starts[j]:starts[j] + batch_size] if j < len(starts) else order[:batch_size]
        b = D.collate([enc.input_ids[i] for i in idx], [enc.labels[i] for i in idx], pad_id)
        l, n = loss_sum(model, b, device)
        if j < len(starts):
            total += l.item()
            count += n
    total, count = dist.all_sum([total, float(count)], device)
    model.train(was_training)
    return total / max(count, 1)


class JsonlLog:
    """Append-only log.jsonl; on resume it is cut back to the lines the checkpoint had seen."""

    def __init__(self, path: Path, keep_lines: int | None) -> None:
        self.path = path
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
        if keep_lines is not None:
            lines = lines[:keep_lines]
            if dist.is_main():  # one writer, atomic: a kill here must not lose the lines before the checkpoint
                C.atomic_write_text(path, "".join(lines))
        self.lines = len(lines)
        self.enabled = dist.is_main()
        self.f = open(path, "a", encoding="utf-8") if self.enabled else None

    def write(self, rec: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.f.flush()
        self.lines += 1

    def sync(self) -> None:
        if self.f is not None:
            os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def finished(run_dir: Path) -> bool:
    p = run_dir / "log.jsonl"
    if not (p.is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()):
        return False
    for ln in p.read_text(encoding="utf-8").splitlines()[-3:]:
        try:
            if json.loads(ln).get("event") == "end":
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


def lock_output_dir(out: Path) -> Any:
    """Hold an exclusive lock on the run folder for the life of the process.

    Two `lorafit train` processes writing one folder would interleave log lines and checkpoints;
    the second one is refused instead. The lock dies with its process (kill -9 included).
    """
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError("output folder is in use by another `lorafit train`", file=str(out), field="output_dir") from None
    return f


# ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Fine-tune per `cfg`; resumes from the last complete checkpoint in `cfg.output_dir`."""
    out = Path(cfg.output_dir)
    check_output_dir(out)
    if finished(out):
        log.info("%s already holds a finished run; nothing to do", out)
        return TrainResult(out, cfg.total_steps or 0)

    # --- setup: everything that can fail on bad input happens before the first byte is written
    datasets = D.build_datasets(cfg)
    tok = D.ensure_template(load_tokenizer(cfg.model), cfg.template)
    enc = D.encode_all(tok, datasets.train, cfg)
    if not enc.input_ids:
        raise ConfigError("no training example has a supervised token left after truncation", field="max_length")
    val_enc = {k: D.encode_all(tok, v, cfg) for k, v in datasets.val.items()}
    device = pick_device(cfg.device)
    rank, local_rank, ws = dist.world()
    if device.type == "cuda" and ws > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init(device)
    ga = cfg.gradient_accumulation_steps
    if ga % ws:
        raise ConfigError(f"gradient_accumulation_steps ({ga}) must be a multiple of the number of processes ({ws}) "
                          "to keep the global batch", field="gradient_accumulation_steps")
    stream = (PackedStream(enc, cfg.batch_size, cfg.pack_tokens or cfg.batch_size * cfg.max_length, cfg.seed,
                           tok.pad_token_id) if cfg.packing else Stream(enc, cfg.batch_size, cfg.seed, tok.pad_token_id))
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.num_epochs * stream.per_epoch) // ga)
    cfg.total_steps = total
    cfg.effective_warmup_steps = cfg.resolve_warmup(total)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # Under torchrun the base is loaded on the CPU first: its size decides `distributed: auto`, and
    # FSDP moves only each rank's shard to the GPU (a base too big for one GPU is never there whole).
    dtype = str(pick_dtype(cfg.dtype, device)).split(".")[-1]
    base = load_model(cfg.model, device="cpu" if ws > 1 else str(device), dtype=dtype)
    strategy = dist.choose(cfg.distributed, dist.model_bytes(base), device) if ws > 1 else "none"
    if strategy == "fsdp" and cfg.fused_kernels:
        raise ConfigError("fused_kernels is not supported under FSDP (chosen for a model of "
                          f"{dist.model_bytes(base) / 2**30:.1f} GiB); set fused_kernels: false or distributed: ddp",
                          field="fused_kernels")
    if strategy != "fsdp":
        base.to(device)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(base, cfg)
    dropout_seed = None
    if cfg.fused_kernels:
        from ..kernels import accelerate_model
        from ..kernels._triton import use_triton

        # Where Triton runs, LoRA dropout is drawn inside the rank-r products from a seed (the fast path,
        # docs/speed.md); the seed is set per micro-batch below, like torch's RNG for the other paths.
        model = accelerate_model(model, seeded_dropout=use_triton(torch.empty(0, device=device)))
        dropout_seed = getattr(model.get_base_model(), "lorafit_dropout_seed", None)
        if dropout_seed is not None and cfg.lora_dropout > 0:
            _check_seeded_dropout_size(cfg, model.get_base_model().config)
    peft_model = model
    if cfg.fused_kernels:
        model = FusedLoss(model)  # the loss is the forward DDP wraps (see FusedLoss)
    model = dist.wrap(model, strategy, device)  # before the optimizer: FSDP replaces the parameters
    sharded = dist.is_sharded(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

    # --- resume or start
    lock = lock_output_dir(out) if dist.is_main() else None  # held until the run ends
    ckpt_root = out / "checkpoints"
    ckpt = C.latest_valid(ckpt_root) if ckpt_root.exists() else None
    state: dict[str, Any] = {"step": 0, "log_lines": 0, "best_loss": None, "best_step": None, "bad_evals": 0,
                             "nonfinite_run": 0}
    if ckpt is not None:
        state = C.load_checkpoint(ckpt, model=peft_model, optimizer=opt)
    if dist.is_main():
        save_config(cfg, out / "config.yaml")
    dist.barrier()
    logf = JsonlLog(out / "log.jsonl", state["log_lines"])
    start = state["step"]
    if ckpt is not None:
        logf.write({"type": "event", "step": start, "event": "resume", "checkpoint": ckpt.name, "world_size": ws})
        log.info("resumed from %s (step %d)", ckpt, start)
    else:
        logf.write({"type": "event", "step": 0, "event": "start", "total_steps": total,
                    "effective_warmup_steps": cfg.effective_warmup_steps, "train_examples": len(enc.input_ids),
                    "general_examples": datasets.n_general, "truncated_examples": enc.n_truncated,
                    "val_sets": {k: len(v.input_ids) for k, v in val_enc.items()}, "world_size": ws,
                    "distributed": strategy, "device": str(device), "micro_batches_per_epoch": stream.per_epoch,
                    "packing": bool(cfg.packing)})
    log.info("effective warmup: %d of %d steps (max(warmup_steps=%d, ceil(%.3g x %d)))",
             cfg.effective_warmup_steps, total, cfg.warmup_steps, cfg.warmup_ratio, total)
    log.info("%d training examples (%d general), %d truncated to max_length=%d", len(enc.input_ids),
             datasets.n_general, enc.n_truncated, cfg.max_length)

    monitor = next((k for k in val_enc if k != "general"), None)
    stopped_early = False
    last_eval: dict[str, float] = {}

    def run_eval(step: int) -> bool:
        """Evaluate every set; returns True when early stopping says stop."""
        nonlocal last_eval
        last_eval = {}
        for name, v in val_enc.items():
            last_eval[name] = evaluate_loss(model, v, cfg.eval_batch_size, tok.pad_token_id, device)
            logf.write({"type": "eval", "step": step, "split": name, "eval_loss": last_eval[name]})
        if monitor is None:
            return False
        cur = last_eval[monitor]
        if state["best_loss"] is None or cur < state["best_loss"]:
            state.update(best_loss=cur, best_step=step, bad_evals=0)
            if cfg.early_stopping_patience and step > 0:
                full = C.trainable_state(peft_model) if sharded else None  # a collective under FSDP
                if dist.is_main():
                    C.save_adapter_atomic(peft_model, out / "best-adapter", full)
        else:
            state["bad_evals"] += 1
        return bool(cfg.early_stopping_patience) and state["bad_evals"] >= cfg.early_stopping_patience

    if start == 0 and ckpt is None and val_enc:
        run_eval(0)

    bar = None
    if progress and dist.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    # The running loss of the current logging window is checkpointed, so a resume logs the same mean.
    acc_loss, acc_steps = state.get("acc_loss", 0.0), state.get("acc_steps", 0)
    acc_tokens, t_last = 0, time.perf_counter()
    step = start
    for step in range(start, total):
        lr = lr_at(step, peak=cfg.learning_rate, warmup=cfg.effective_warmup_steps, total=total,
                   kind=cfg.lr_scheduler, min_ratio=cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        window = list(range(step * ga, (step + 1) * ga))
        denom = sum(stream.n_supervised(k) for k in window)
        mine = window[rank::ws]
        step_loss = 0.0
        for j, k in enumerate(mine):
            batch = stream.batch(k)
            # Dropout masks are a function of the run's micro-batch index, not of the process: N processes
            # draw the masks one process would, so a run's losses do not depend on the number of GPUs.
            torch.manual_seed(cfg.seed * 1_000_003 + k)
            if dropout_seed is not None:  # advanced once by the forward: the masks are those of (seed, k)
                dropout_seed.value.fill_(cfg.seed * 1_000_003 + k - 1)
            with dist.no_sync(model, last=j == len(mine) - 1):
                lsum, _ = loss_sum(model, batch, device, cfg.fused_kernels)
                loss = lsum * (ws / max(denom, 1))
                loss.backward()
            step_loss += lsum.detach().item()
            acc_tokens += batch_tokens(batch)
        if cfg.l2_penalty:
            # Classic L2, a penalty l2_penalty * sum(w^2) in the loss (unlike AdamW's decoupled decay),
            # applied as that term's gradient, once, to the reduced gradients (or their FSDP shards):
            # the same update whatever the number of processes or micro-batches.
            with torch.no_grad():
                with_grad = [p for p in params if p.grad is not None]
                torch._foreach_add_([p.grad for p in with_grad], [p.detach() for p in with_grad], alpha=2 * cfg.l2_penalty)
        step_loss = dist.all_sum([step_loss], device)[0] / max(denom, 1)
        gnorm = dist.as_float(torch.nn.utils.clip_grad_norm_(
            params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
        if not (math.isfinite(step_loss) and math.isfinite(gnorm)):
            opt.zero_grad(set_to_none=True)
            state["nonfinite_run"] += 1
            logf.write({"type": "event", "step": step + 1, "event": "nonfinite_skip", "loss": None if not math.isfinite(step_loss) else step_loss,
                        "grad_norm": None if not math.isfinite(gnorm) else gnorm, "consecutive": state["nonfinite_run"]})
            log.warning("step %d: non-finite loss/gradient, step skipped (%d in a row)", step + 1, state["nonfinite_run"])
            if state["nonfinite_run"] >= cfg.max_nonfinite_steps:
                logf.write({"type": "event", "step": step + 1, "event": "diverged",
                            "reason": f"{state['nonfinite_run']} consecutive non-finite steps"})
                logf.close()
                raise TrainingError(f"training diverged: {state['nonfinite_run']} consecutive non-finite steps at step "
                                    f"{step + 1}; lower learning_rate (e.g. {cfg.learning_rate / 10:g}) or raise warmup; "
                                    "no adapter was saved", file=str(out))
            continue
        state["nonfinite_run"] = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc_loss += step_loss
        acc_steps += 1
        done = step + 1
        if done % cfg.logging_steps == 0 or done == total:
            now = time.perf_counter()
            tps = dist.all_sum([float(acc_tokens)], device)[0] / max(now - t_last, 1e-9)
            rec = {"type": "train", "step": done, "epoch": round(done * ga / stream.per_epoch, 4),
                   "loss": acc_loss / acc_steps, "lr": lr, "grad_norm": gnorm, "tokens_per_s": round(tps, 1)}
            logf.write(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            acc_loss, acc_steps, acc_tokens, t_last = 0.0, 0, 0, now
        stop = False
        if val_enc and (done % cfg.eval_steps == 0 or done == total):
            stop = run_eval(done)
        if bar is not None:
            bar.update(1)
        if (done % cfg.save_steps == 0 and done < total) or stop:
            state.update(step=done, acc_loss=acc_loss, acc_steps=acc_steps)
            logf.sync()
            state["log_lines"] = logf.lines
            full, full_opt = (C.trainable_state(peft_model), C.optimizer_state(opt)) if sharded else (None, None)
            if dist.is_main():
                C.save_checkpoint(ckpt_root, done, model=peft_model, optimizer=opt, state=state, keep=cfg.save_total_limit,
                                  weights=full, optim_state=full_opt)
            dist.barrier()
        if stop:
            stopped_early = True
            logf.write({"type": "event", "step": done, "event": "early_stop", "best_step": state["best_step"],
                        "best_loss": state["best_loss"]})
            break
    if bar is not None:
        bar.close()

    # --- save: never a non-finite adapter; early stopping restores the best one
    full = C.trainable_state(peft_model) if sharded else None  # a collective under FSDP
    if dist.is_main():
        if full is None:
            assert_finite(peft_model)
        elif (bad := C.first_nonfinite(full)) is not None:
            raise TrainingError(f"non-finite values in adapter weight {bad}; refusing to save/merge")
        if cfg.early_stopping_patience and (out / "best-adapter").is_dir():
            if (out / "adapter").exists():
                shutil.rmtree(out / "adapter")
            os.replace(out / "best-adapter", out / "adapter")
        elif full is None:
            C.save_adapter_atomic(peft_model, out / "adapter")
        else:
            C.save_adapter_atomic(peft_model, out / "adapter", full)
        logf.write({"type": "event", "step": step + 1 if total > start else start, "event": "end",
                    "best_step": state["best_step"], "best_loss": state["best_loss"], "final_eval": last_eval})
        logf.sync()
    logf.close()
    if lock is not None:  # a finished run leaves no lock file behind
        (out / ".lock").unlink(missing_ok=True)
        lock.close()
    dist.barrier()
    dist.cleanup()
    return TrainResult(out, total, last_eval, stopped_early, None if ckpt is None else int(ckpt.name.split("-")[1]))
