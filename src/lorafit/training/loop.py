"""The trainer, in phases (as torchtune's recipes and litgpt's finetune are): `setup` (data, model,
wrapper, optimizer) -> `resume` -> `fit`, a loop of `launch` / `resolve` / maybe `evaluate` / maybe
`checkpoint` -> `finish`. State lives in `LoopState` (what a checkpoint holds) and `Plan` (what is
resolved from the config and the world size: returned and logged, never written back into the config).

Data order and LR are pure functions of the step, so resume is exact, and of the run's micro-batch
index, not of the process, so N processes compute what one process with N-fold accumulation would.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data as D
from ..config import TrainConfig, fused_kernels_refused, save_config
from ..errors import ConfigError, TrainingError
from ..model import apply_lora, assert_finite, load_model, load_tokenizer, pick_device, pick_dtype
from . import checkpoint as C
from . import dist
from ..data.batches import PackedStream, Stream, deals
from .. import rundir
from ..rundir import FolderLock, check_output_dir, finished
from .runlog import JsonlLog
from .schedule import lr_at
from .graphstep import BucketedStep
from .optim import FlatAdamW
from .plan import _check_seeded_dropout_size, check_fp8, make_plan, resolve_fused, step_kind, varlen_ready
from .state import LoopState, PendingStep, TrainResult
from .step import FusedLoss, evaluate_loss, loss_sum  # loss_sum: looked up here per micro-batch (tests patch it)

log = logging.getLogger("lorafit")

# Pipelined steps (the host prepares step n+1 while the GPU runs step n; the optimizer step is guarded on the
# device): None = on wherever the optimizer is fused on a GPU. Tests set True to run the pipeline on the CPU.
PIPELINE: bool | None = None


class Trainer:
    """One run of `lorafit train`. `run()` is the whole recipe; each phase is a method."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True, config_path: str | Path | None = None) -> None:
        self.cfg, self.progress, self.config_path = cfg, progress, config_path
        self.out = Path(cfg.output_dir)
        self.lock: FolderLock | None = None
        self.logf: JsonlLog | None = None
        self.trackers: Any = None
        self.state = LoopState()
        self.last_eval: dict[str, float] = {}
        self.watchdog = dist.Watchdog(cfg.dist_timeout, on_fire=self.close_files)
        self.bar: Any = None

    # --- setup: everything that can fail on bad input happens before the first byte is written
    def setup_data(self) -> None:
        cfg = self.cfg
        self.datasets = D.build_datasets(cfg)
        self.tok = D.ensure_template(load_tokenizer(cfg.model), cfg.template)
        self.enc = D.encode_all(self.tok, self.datasets.train, cfg)
        if not self.enc.input_ids:
            raise ConfigError("no training example has a supervised token left after truncation", field="max_length")
        self.val_enc = {k: D.encode_all(self.tok, v, cfg) for k, v in self.datasets.val.items()}
        self.stream = (PackedStream(self.enc, cfg.batch_size, cfg.pack_tokens or cfg.batch_size * cfg.max_length,
                                    cfg.seed, self.tok.pad_token_id) if cfg.packing
                       else Stream(self.enc, cfg.batch_size, cfg.seed, self.tok.pad_token_id))
        self.plan = make_plan(cfg, self.stream.per_epoch, dist.world()[2])

    def setup_model(self) -> None:
        cfg = self.cfg
        device = pick_device(cfg.device)
        self.rank, local_rank, ws = dist.world()
        if device.type == "cuda" and ws > 1:
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"{ws} processes per node but only {torch.cuda.device_count()} GPUs", field="--nproc")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self.device = device
        dist.init(device, cfg.dist_timeout)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        # Under torchrun the base is loaded on the CPU first: its size decides `distributed: auto`, and
        # FSDP moves only each rank's shard to the GPU (a base too big for one GPU is never there whole).
        dtype = str(pick_dtype(cfg.dtype, device)).split(".")[-1]
        base = load_model(cfg.model, device="cpu" if ws > 1 else str(device), dtype=dtype)
        self.strategy = dist.choose(cfg.distributed, dist.model_bytes(base), device) if ws > 1 else "none"
        refused = fused_kernels_refused(cfg.fused_kernels, self.strategy)  # `auto` may have chosen FSDP
        if refused:
            raise ConfigError(f"{refused}; FSDP was chosen for a model of {dist.model_bytes(base) / 2**30:.1f} GiB",
                              field="fused_kernels")
        self.fused = resolve_fused(cfg.fused_kernels, device, self.strategy)
        if cfg.quantize_base == "fp8":
            check_fp8(self.fused, device, self.strategy)
        if self.strategy != "fsdp":
            base.to(device)
        if cfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = apply_lora(base, cfg)
        self.dropout_seed = self.kernels = None  # kernels: the fused model's handle (kernels.Accelerated)
        unsupported = ""
        if self.fused:
            from ..kernels import accelerate_model, accelerated
            from ..kernels._triton import use_triton
            from ..kernels.accelerate import CAUSAL_LM

            # Where Triton runs, LoRA dropout is drawn inside the rank-r products from a seed (the fast path,
            # docs/speed.md); the seed is set per micro-batch, like torch's RNG for the other paths.
            # max_positions: no token attends past its own example, at most max_length tokens (packs attend
            # per example), so a sliding window at least that long never cuts and the layer may be fused.
            model = accelerate_model(model, seeded_dropout=use_triton(torch.empty(0, device=device)),
                                     max_positions=cfg.max_length, fp8_base=cfg.quantize_base == "fp8",
                                     fp8_offload=ws == 1)  # one process: nothing else reads the copied bf16 weights
            self.kernels = accelerated(model)
            self.dropout_seed = self.kernels.dropout_seed
            if self.kernels.acceleration.swapped == 0:  # an architecture the fused kernels do not cover
                self.kernels.restore()
                self.kernels = self.dropout_seed = None
                self.fused = False
                unsupported = f"no fused kernels for {type(model.get_base_model()).__name__}"
                if cfg.quantize_base == "fp8":
                    raise ConfigError(f"fp8 runs inside lorafit's fused kernels, which do not cover "
                                      f"{type(model.get_base_model()).__name__} (they cover {', '.join(CAUSAL_LM)})",
                                      field="quantize_base")
            if self.dropout_seed is not None and cfg.lora_dropout > 0:
                _check_seeded_dropout_size(cfg, model.get_base_model().config)
        self.peft_model = model
        self.step_kind, why = step_kind(cfg, self.fused, device, self.strategy, self.dropout_seed is not None)
        if unsupported:
            why = unsupported
        if self.step_kind in ("cuda_graph", "bucketed") and not varlen_ready(model):
            self.step_kind, why = "eager_fused", "the model's attention is not lorafit's fused varlen attention"
        log.info("training step: %s%s", self.step_kind, f" ({why})" if why else "")
        if (fp8 := self.fp8_weights()) is not None:
            log.info("quantize_base: fp8: %d frozen weights as FP8 copies (%.2f GiB); %.2f GiB of their bf16 weights "
                     "moved to host memory for the run", len(fp8), fp8.nbytes / 2**30, fp8.offloaded_nbytes / 2**30)
        self.step_reason = why
        self.bucketed = None
        if self.step_kind in ("cuda_graph", "bucketed"):
            params = [p for p in model.parameters() if p.requires_grad]
            if ws > 1:  # no DDP wrapper around a replayed graph: same start everywhere, gradients averaged by hand
                with self.watchdog.phase("setup (broadcasting the adapter)"):
                    dist.broadcast_params(params)
            budget = max(cfg.pack_tokens or cfg.batch_size * cfg.max_length, cfg.max_length) if cfg.packing \
                else cfg.batch_size * cfg.max_length
            # Under several processes this connects the gradient all-reduce's communicator: a collective.
            with self.watchdog.phase("setup (connecting the gradient all-reduce)"):
                self.bucketed = BucketedStep(model, params, budget=budget, pad_id=self.tok.pad_token_id, device=device,
                                             capture=self.step_kind == "cuda_graph", seed=self.dropout_seed,
                                             reduce_in_backward=ws > 1 and self.plan.micro_batches_per_step <= ws)
            self.model = model
        else:
            if self.fused:
                model = FusedLoss(model)  # the loss is the forward DDP wraps (see FusedLoss)
            with self.watchdog.phase("setup (wrapping the model for several processes)"):
                self.model = dist.wrap(model, self.strategy, device)  # before the optimizer: FSDP replaces parameters
        self.sharded = dist.is_sharded(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # On GPUs the fused AdamW (one kernel for every tensor, as HF's adamw_torch_fused): the step's host cost
        # is fixed per optimizer step, so it weighs most where each process has little work (several GPUs).
        fused = device.type == "cuda" and not self.sharded
        self.pipelined = fused if PIPELINE is None else (PIPELINE and not self.sharded)
        hyper = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                     weight_decay=cfg.weight_decay, fused=(fused or self.pipelined) or None)
        flat = self.bucketed.flat_grad if self.bucketed is not None else None
        # The bucketed step's adapter is one flat buffer (gradients and, here, parameters): one AdamW tensor.
        self.opt = FlatAdamW(self.params, flat, **hyper) if flat is not None else torch.optim.AdamW(self.params, **hyper)
        self._host = [torch.zeros(3, dtype=torch.float64, pin_memory=device.type == "cuda") for _ in range(2)]

    # --- resume or start
    def resume(self) -> Path | None:
        cfg, plan, out = self.cfg, self.plan, self.out
        if dist.is_main():
            self.lock = FolderLock(out)  # held until the run ends
            rundir.mark_run_dir(out)
        ckpt_root = out / rundir.CHECKPOINTS
        ckpt = C.latest_valid(ckpt_root) if ckpt_root.exists() else None
        if ckpt is not None:
            self.state = LoopState.from_dict(C.load_checkpoint(ckpt, model=self.peft_model, optimizer=self.opt))
        if dist.is_main():
            save_config(dataclasses.replace(cfg, total_steps=plan.total_steps, effective_warmup_steps=plan.warmup_steps,
                                            global_batch_size=plan.global_batch_size, world_size=plan.world_size),
                        out / rundir.CONFIG)
            if cfg.report_to:
                from ..trackers import Trackers

                self.trackers = Trackers.open(cfg.report_to, out, cfg.to_dict())
        with self.watchdog.phase("setup (waiting for every process to open the run folder)"):
            dist.barrier()
        self.logf = JsonlLog(out / rundir.LOG, self.state.log_lines,
                             sink=None if self.trackers is None else self.trackers.log)
        if ckpt is not None:
            self.logf.write(rundir.event(self.state.step, rundir.RESUME, checkpoint=ckpt.name,
                                         world_size=plan.world_size))
            log.info("resumed from %s (step %d)", ckpt, self.state.step)
        else:
            self.logf.write(rundir.event(
                0, rundir.START, total_steps=plan.total_steps, effective_warmup_steps=plan.warmup_steps,
                train_examples=len(self.enc.input_ids), general_examples=self.datasets.n_general,
                truncated_examples=self.enc.n_truncated,
                val_sets={k: len(v.input_ids) for k, v in self.val_enc.items()},
                world_size=plan.world_size, global_batch_size=plan.global_batch_size,
                learning_rate=cfg.learning_rate, distributed=self.strategy, device=str(self.device),
                micro_batches_per_epoch=plan.micro_batches_per_epoch, packing=bool(cfg.packing),
                fused_kernels=self.fused, step_kind=self.step_kind,
                **({"step_fallback": self.step_reason} if self.step_reason else {}),
                **({"fp8_copies_gib": round(fp8.nbytes / 2**30, 6),
                    "fp8_offloaded_gib": round(fp8.offloaded_nbytes / 2**30, 6)} if (fp8 := self.fp8_weights()) else {})))
        log.info("effective warmup: %d of %d steps (max(warmup_steps=%d, ceil(%.3g x %d)))",
                 plan.warmup_steps, plan.total_steps, cfg.warmup_steps, cfg.warmup_ratio, plan.total_steps)
        log.info("%d training examples (%d general), %d truncated to max_length=%d; global batch %d "
                 "(%d per device x %d accumulation x %d processes)", len(self.enc.input_ids), self.datasets.n_general,
                 self.enc.n_truncated, cfg.max_length, plan.global_batch_size, cfg.batch_size,
                 cfg.gradient_accumulation_steps, plan.world_size)
        return ckpt

    def fp8_weights(self) -> Any:
        """The FP8 copies of the frozen weights (`quantize_base: fp8`, a `kernels.fp8.Fp8Weights`), or None."""
        return getattr(self.kernels, "fp8_weights", None)

    # --- the loop's three pieces
    def evaluate(self, step: int) -> bool:
        """Evaluate every set; True when early stopping says stop. Every rank takes the same branch: the
        losses are all-reduced, so each rank holds the same values."""
        cfg, s = self.cfg, self.state
        self.last_eval = {}
        for name, v in self.val_enc.items():
            with self.watchdog.phase(f"evaluation of '{name}' at step {step}"):
                self.last_eval[name] = evaluate_loss(self.peft_model if self.fused else self.model, v, cfg.eval_batch_size,
                                                     self.tok.pad_token_id, self.device, flat=self.fused)
            self.logf.write(rundir.eval_record(step, name, self.last_eval[name]))
        monitor = next((k for k in self.val_enc if k != "general"), None)
        if monitor is None:
            return False
        cur = self.last_eval[monitor]
        if s.best_loss is None or cur < s.best_loss:
            s.best_loss, s.best_step, s.bad_evals = cur, step, 0
            if cfg.early_stopping_patience and step > 0:
                with self.watchdog.phase(f"best-adapter save at step {step}"):
                    full = C.trainable_state(self.peft_model) if self.sharded else None  # a collective under FSDP
                    if dist.is_main():
                        C.save_adapter_atomic(self.peft_model, self.out / rundir.BEST_ADAPTER, full)
        else:
            s.bad_evals += 1
        return bool(cfg.early_stopping_patience) and s.bad_evals >= cfg.early_stopping_patience

    def launch(self, step: int) -> "PendingStep":
        """Issue optimizer step `step`: micro-batches, gradient reduction, clipping, and (pipelined) the
        optimizer step itself, guarded on the device by the step's finiteness, with no host synchronisation.
        `resolve` reads the outcome."""
        cfg, plan = self.cfg, self.plan
        rank, ws = self.rank, plan.world_size
        lr = lr_at(step, peak=cfg.learning_rate, warmup=plan.warmup_steps, total=plan.total_steps,
                   kind=cfg.lr_scheduler, min_ratio=cfg.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr
        window = range(step * plan.micro_batches_per_step, (step + 1) * plan.micro_batches_per_step)
        mine = list(window)[rank::ws]
        # The step's examples: several micro-batches a step are dealt over `balance_steps` steps into micro-batches
        # of near-equal tokens (Stream.step_groups); the bucketed step runs them as they are (one row each),
        # padded batches re-cut the same examples by length (Stream.padded).
        dealing = deals(cfg.batch_size, plan.micro_batches_per_step, cfg.balance_steps, cfg.packing)
        groups = self.stream.step_groups(step, plan.micro_batches_per_step, cfg.balance_steps if dealing else 0,
                                         plan.total_steps)
        denom = sum(self.stream.supervised(g) for g in groups)
        if self.bucketed is not None:
            dealt = [self.stream.examples(g) for g in groups[rank::ws]]
        elif dealing:
            dealt = [self.stream.collate(g) for g in self.stream.padded(groups, ws)[rank::ws]]
        else:
            dealt = [self.stream.batch(k) for k in mine]
        # The gradient is the mean over the step's supervised tokens. DDP (the eager step) averages over the ranks,
        # so there each rank scales by N/denominator; the bucketed step sums over the ranks (in backward or after).
        reducer = self.bucketed.reducer if self.bucketed is not None else None
        scale = (1 if self.bucketed is not None else ws) / max(denom, 1)
        local_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        with self.watchdog.phase(f"training step {step + 1}"):
            for j, k in enumerate(mine):
                # Dropout masks are a function of the run's micro-batch index, not of the process: N processes
                # draw the masks one process would, so a run's losses do not depend on the number of GPUs.
                torch.manual_seed(cfg.seed * 1_000_003 + k)
                if self.kernels is not None:  # seeded dropout: the next forward draws the masks of (seed, k)
                    self.kernels.set_micro_batch(cfg.seed, k)
                if self.bucketed is not None:
                    lsum = self.bucketed(dealt[j], scale)
                else:
                    with dist.no_sync(self.model, last=j == len(mine) - 1):
                        lsum, _ = loss_sum(self.model, dealt[j], self.device, self.fused)
                        (lsum * scale).backward()
                local_loss += lsum.detach()  # no host sync per micro-batch
            if reducer is not None and not mine:
                reducer.idle()  # no micro-batch here this step: join the in-backward collectives with zeros
            elif self.bucketed is not None and reducer is None and ws > 1:
                dist.sum_gradients(self.params, self.bucketed.flat_grad)  # what DDP's hooks do on the eager path
            if cfg.l2_penalty:
                # Classic L2, a penalty l2_penalty * sum(w^2) in the loss (unlike AdamW's decoupled decay),
                # applied as that term's gradient, once, to the reduced gradients (or their FSDP shards):
                # the same update whatever the number of processes or micro-batches.
                with torch.no_grad():
                    with_grad = [p for p in self.params if p.grad is not None]
                    torch._foreach_add_([p.grad for p in with_grad], [p.detach() for p in with_grad],
                                        alpha=2 * cfg.l2_penalty)
            norm = self._clip()
            # One all-reduce carries the loss, every rank's verdict on its gradient norm and the norm itself
            # (the same on every rank), so a NaN on one rank only sends every rank down the same branch.
            packed = torch.stack([local_loss, (~torch.isfinite(norm)).to(torch.float64),
                                  torch.nan_to_num(norm.to(torch.float64))])
            dist.all_reduce_sum(packed)
        tokens = sum(self.stream.tokens(g) for g in groups)  # every rank's, known on the host
        pending = PendingStep(step, lr, denom, tokens, packed)
        if self.pipelined:
            bad = ((packed[1] > 0) | ~torch.isfinite(packed[0])).to(torch.float32)
            self.opt.found_inf = bad  # the fused AdamW leaves parameters, moments and step count alone when set
            self.opt.step()
            self._zero_grad()
            if packed.is_cuda:  # read back through pinned memory after an event, not by waiting for the stream
                host = self._host[step % 2]
                host.copy_(packed, non_blocking=True)
                pending.values, pending.event = host, torch.cuda.Event()
                pending.event.record()
        return pending

    def _clip(self) -> torch.Tensor:
        """The reduced gradient's norm (a device scalar, the same on every rank), gradients clipped to
        `max_grad_norm`. On the bucketed step's flat buffer: one norm kernel, and with the fused AdamW the
        clipping rides in the optimizer's own kernel (`grad_scale`: gradients divided by max(1, norm / max))
        instead of a pass of its own over the gradients; elsewhere `clip_grad_norm_`."""
        cfg = self.cfg
        flat = self.bucketed.flat_grad if self.bucketed is not None else None
        if flat is None:
            return dist.full_tensor(torch.nn.utils.clip_grad_norm_(
                self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))).detach()
        norm = torch.linalg.vector_norm(flat)
        if cfg.max_grad_norm > 0:
            # clip_grad_norm_'s rule: scale by min(1, max / (norm + 1e-6))
            divisor = ((norm + 1e-6) / cfg.max_grad_norm).clamp_(min=1.0)
            if self.opt.defaults.get("fused"):  # the fused AdamW divides the gradients by it as it reads them
                self.opt.grad_scale = divisor
            else:
                flat.div_(divisor)
        return norm

    def _zero_grad(self) -> None:
        """A replayed graph accumulates into the gradient buffers it was captured with: zero them (one
        kernel over the flat buffer), never free them. Other steps free them, as HF Trainer does."""
        if self.bucketed is not None and self.bucketed.flat_grad is not None:
            self.bucketed.flat_grad.zero_()
        else:
            self.opt.zero_grad(set_to_none=self.bucketed is None)

    def resolve(self, p: "PendingStep") -> tuple[float, float, float, int] | None:
        """Read a launched step's outcome: (mean loss, grad norm, lr, real tokens), or None when it was
        skipped as non-finite. Unpipelined, the optimizer step (or the skip) happens here."""
        with self.watchdog.phase(f"training step {p.step + 1}"):
            if p.event is not None:
                p.event.synchronize()
            elif p.values.is_cuda:  # wait with the GIL released (the watchdog thread must be able to run)
                torch.cuda.current_stream(p.values.device).synchronize()
            loss_total, bad, gnorm_sum = p.values.tolist()
        gnorm = gnorm_sum / self.plan.world_size if not bad else float("nan")
        step_loss = loss_total / max(p.denom, 1)
        ok = math.isfinite(step_loss) and not bad
        if not self.pipelined:
            if ok:
                self.opt.step()
            self._zero_grad()
        if not ok:
            self._nonfinite(p.step, step_loss, gnorm)
            return None
        self.state.nonfinite_run = 0
        return step_loss, gnorm, p.lr, p.tokens

    def _nonfinite(self, step: int, step_loss: float, gnorm: float) -> None:
        s, cfg = self.state, self.cfg
        s.nonfinite_run += 1
        self.logf.write(rundir.event(step + 1, rundir.NONFINITE_SKIP,
                                     loss=step_loss if math.isfinite(step_loss) else None,
                                     grad_norm=gnorm if math.isfinite(gnorm) else None, consecutive=s.nonfinite_run))
        log.warning("step %d: non-finite loss/gradient, step skipped (%d in a row)", step + 1, s.nonfinite_run)
        if s.nonfinite_run >= cfg.max_nonfinite_steps:
            self.logf.write(rundir.event(step + 1, rundir.DIVERGED,
                                         reason=f"{s.nonfinite_run} consecutive non-finite steps"))
            raise TrainingError(f"training diverged: {s.nonfinite_run} consecutive non-finite steps at step "
                                f"{step + 1}; lower learning_rate (e.g. {cfg.learning_rate / 10:g}) or raise warmup; "
                                "no adapter was saved", file=str(self.out))

    def checkpoint(self, done: int) -> None:
        s = self.state
        s.step = done
        self.logf.sync()
        s.log_lines = self.logf.lines
        with self.watchdog.phase(f"checkpoint at step {done}"):
            full, full_opt = (C.trainable_state(self.peft_model), C.optimizer_state(self.opt)) if self.sharded else (None, None)
            if dist.is_main():
                C.save_checkpoint(self.out / rundir.CHECKPOINTS, done, model=self.peft_model, optimizer=self.opt,
                                  state=dataclasses.asdict(s), keep=self.cfg.save_total_limit, weights=full,
                                  optim_state=full_opt)
            dist.barrier()

    def fit(self, start: int) -> tuple[int, bool]:
        """Steps start..total; returns (steps done, stopped early).

        Pipelined, step n+1 is launched before step n is read back, except after a step that evaluates,
        checkpoints or ends the run (those need its outcome and its weights first): the GPU never waits for
        the host's logging and data preparation, and every decision is the one the unpipelined loop takes."""
        total = self.plan.total_steps
        if start == 0 and self.state.log_lines == 0 and self.val_enc:
            self.evaluate(0)
        self.bar = None
        if self.progress and dist.is_main():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        self.model.train()
        self.acc_tokens, self.t_last = 0, time.perf_counter()
        done, pending = start, None
        for step in range(start, total):
            current = self.launch(step)
            if pending is not None:
                self.after(pending)  # never a boundary: it only logs
            pending = current
            if self.pipelined and not self._boundary(step + 1):
                continue
            pending = None
            if self.after(current):
                done = step + 1
                self.logf.write(rundir.event(done, rundir.EARLY_STOP, best_step=self.state.best_step,
                                             best_loss=self.state.best_loss))
                self._close_bar()
                return done, True
            done = step + 1
        self._close_bar()
        return max(done, total if total > start else start), False

    def _boundary(self, done: int) -> bool:
        """Whether the loop evaluates, checkpoints or ends after step `done` (if it is not skipped)."""
        cfg = self.cfg
        return done == self.plan.total_steps or done % cfg.save_steps == 0 or \
            (bool(self.val_enc) and done % cfg.eval_steps == 0)

    def after(self, p: "PendingStep") -> bool:
        """Everything that follows a step once its outcome is known: the log, and at boundaries evaluation
        and checkpoints. True when early stopping says stop."""
        res = self.resolve(p)
        if res is None:
            return False
        cfg, s, total = self.cfg, self.state, self.plan.total_steps
        step_loss, gnorm, lr, tokens = res
        s.acc_loss += step_loss
        s.acc_steps += 1
        self.acc_tokens += tokens
        done = p.step + 1
        if done % cfg.logging_steps == 0 or done == total:
            now = time.perf_counter()
            tps = self.acc_tokens / max(now - self.t_last, 1e-9)
            rec = rundir.train_record(done, done * self.plan.micro_batches_per_step / self.plan.micro_batches_per_epoch,
                                      s.acc_loss / s.acc_steps, lr, gnorm, tps)
            self.logf.write(rec)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            s.acc_loss, s.acc_steps, self.acc_tokens, self.t_last = 0.0, 0, 0, now
        stop = bool(self.val_enc) and (done % cfg.eval_steps == 0 or done == total) and self.evaluate(done)
        if self.bar is not None:
            self.bar.update(1)
        if (done % cfg.save_steps == 0 and done < total) or stop:
            self.checkpoint(done)
        return stop

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # --- finish: never a non-finite adapter; early stopping restores the best one
    def finish(self, done: int) -> None:
        cfg, out, s = self.cfg, self.out, self.state
        with self.watchdog.phase("final adapter save"):
            full = C.trainable_state(self.peft_model) if self.sharded else None  # a collective under FSDP
        if dist.is_main():
            if full is None:
                assert_finite(self.peft_model)
            elif (bad := C.first_nonfinite(full)) is not None:
                raise TrainingError(f"non-finite values in adapter weight {bad}; refusing to save/merge")
            if cfg.early_stopping_patience and (out / rundir.BEST_ADAPTER).is_dir():
                if (out / rundir.ADAPTER).exists():
                    shutil.rmtree(out / rundir.ADAPTER)
                os.replace(out / rundir.BEST_ADAPTER, out / rundir.ADAPTER)
            else:
                C.save_adapter_atomic(self.peft_model, out / rundir.ADAPTER, full)
            self.logf.write(rundir.event(
                done, rundir.END, best_step=s.best_step, best_loss=s.best_loss, final_eval=self.last_eval,
                **({"graphs": self.bucketed.memory()} if self.bucketed is not None else {}),
                **({"peak_memory_gib": round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 3)}
                   if self.device.type == "cuda" else {})))
            self.logf.sync()
        with self.watchdog.phase("the end of the run (waiting for rank 0's adapter save)"):
            dist.barrier()

    def close(self) -> None:
        """Every exit path: free the captured graphs (before `dist.cleanup`), then `close_files`."""
        bucketed = getattr(self, "bucketed", None)
        if bucketed is not None:
            try:  # waits for the device: a peer that never joins a captured collective trips the watchdog
                with self.watchdog.phase("the end of the run (freeing the CUDA graphs)"):
                    bucketed.release()
            except Exception as e:  # a failed device must not hide the error that ended the run
                log.warning("freeing the CUDA graphs failed: %s", e)
        self.close_files()

    def close_files(self) -> None:
        """Close the log and trackers, remove the lock (only its holder does). What the watchdog runs before
        it ends a stuck process: nothing here waits on the device."""
        if self.logf is not None:
            self.logf.close()
        if self.trackers is not None:
            try:
                self.trackers.close()
            except Exception as e:  # a tracker must never cost the user a run
                log.warning("closing trackers failed: %s", e)
            self.trackers = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def run(self) -> TrainResult:
        check_output_dir(self.out)
        rundir.guard_output_dir(self.cfg, self.config_path)  # the output-folder and resume rules
        rundir.check_resume(self.cfg, self.out)
        self.setup_data()  # a finished run still validates its inputs before "nothing to do"
        if finished(self.out):
            log.info("%s already holds a finished run; nothing to do (a finished run is not extended: to train "
                     "further, e.g. with a larger max_steps, use a new output_dir)", self.out)
            return TrainResult(self.out, self.plan.total_steps)
        rundir.check_global_batch(self.cfg, self.plan)
        self.setup_model()
        ckpt = self.resume()
        done, stopped = self.fit(self.state.step)
        self.finish(done)
        return TrainResult(self.out, self.plan.total_steps, self.last_eval, stopped,
                           None if ckpt is None else int(ckpt.name.split("-")[1]))


def train(cfg: TrainConfig, *, progress: bool = True, config_path: str | Path | None = None) -> TrainResult:
    """Fine-tune per `cfg`; resumes from the last complete checkpoint in `cfg.output_dir`."""
    trainer = Trainer(cfg, progress=progress, config_path=config_path)
    try:
        return trainer.run()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # The last checkpoint is intact (written atomically); the same command resumes once there is room.
        raise TrainingError(f"disk full while writing {e.filename or cfg.output_dir}; free space and run the same "
                            "command again: it resumes from the last complete checkpoint",
                            file=str(e.filename or cfg.output_dir)) from None
    finally:
        trainer.close()
        dist.cleanup()
