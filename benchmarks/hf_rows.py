"""The other trainers' rows of bench_trainer.py, each run in a process of its own:

    python benchmarks/hf_rows.py ROW CONFIG.yaml WORKDIR      # writes WORKDIR/ROW.json

  hf     transformers' Trainer + PEFT (the engine under LLaMA-Factory)
  liger  the same with `use_liger_kernel=True` (Liger Kernel's Triton RMSNorm, RoPE, SwiGLU and fused
         linear cross-entropy patched into the model)
  trl    TRL's `SFTTrainer` given the base model and a PEFT `LoraConfig`

All three read the lorafit config bench_trainer.py wrote (model, LoRA, LR, warmup, steps, seed) and take the
same settings: bf16, SDPA attention, `adamw_torch_fused` (plain `adamw_torch` off CUDA), cosine schedule
after warmup, clipping, no gradient checkpointing (TRL's default would turn it on), logging every step.
They are fed lorafit's own tokenised examples (`input_ids` and `labels`, -100 outside the answers) in
lorafit's data order through a sequential sampler, so every row sees the same micro-batches as `lorafit
train`. Tokens/s counts non-padding tokens per optimizer step over its wall time (CUDA synchronised at
step begin and end); peak memory is `torch.cuda.max_memory_allocated`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROWS = ("hf", "liger", "trl")


def ordered_examples(cfg: Any) -> tuple[list[dict[str, list[int]]], Any]:
    """lorafit's encoded examples, one per row of each micro-batch, in the order `lorafit train` takes them."""
    from lorafit import data as D
    from lorafit.model import load_tokenizer
    from lorafit.data.batches import Stream

    tok = D.ensure_template(load_tokenizer(cfg.model), cfg.template)
    enc = D.encode_all(tok, D.build_datasets(cfg).train, cfg)
    stream = Stream(enc, cfg.batch_size, cfg.seed, tok.pad_token_id)
    order = [i for k in range(cfg.max_steps * cfg.gradient_accumulation_steps) for i in stream.indices(k)]
    return [{"input_ids": enc.input_ids[i], "labels": enc.labels[i]} for i in order], tok


def run_row(row: str, config: str | Path, work: str | Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

    import lorafit
    from lorafit.model import lora_config

    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; known: {ROWS}")
    cfg = lorafit.load_config(config)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rows, tok = ordered_examples(cfg)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    tokens = [len(r["input_ids"]) for r in rows]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def _now(self) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001 - transformers' callback signature
            if not self.t:
                self._now()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            self._now()

    common = dict(output_dir=str(work / row), per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps,
                  gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
                  warmup_steps=cfg.resolve_warmup(cfg.max_steps), lr_scheduler_type="cosine", bf16=cuda,
                  optim="adamw_torch_fused" if cuda else "adamw_torch", logging_steps=1, save_strategy="no",
                  report_to=[], seed=cfg.seed, max_grad_norm=cfg.max_grad_norm, dataloader_num_workers=0,
                  gradient_checkpointing=False, use_cpu=not cuda)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    if cuda:
        model = model.cuda()
    clock = Clock()
    if row == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        class InOrderSFT(SFTTrainer):
            def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
                return torch.utils.data.SequentialSampler(self.train_dataset)

        args = SFTConfig(**common, max_length=cfg.max_length, packing=False, shuffle_dataset=False,
                         dataset_num_proc=None)
        trainer = InOrderSFT(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=lora_config(cfg), callbacks=[clock])
    else:
        from peft import get_peft_model
        from transformers import DataCollatorForSeq2Seq, Trainer

        class InOrder(Trainer):
            def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
                return torch.utils.data.SequentialSampler(self.train_dataset)

        model = get_peft_model(model, lora_config(cfg))
        args = TrainingArguments(**common, remove_unused_columns=False, use_liger_kernel=row == "liger")
        feats = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]
        trainer = InOrder(model=model, args=args, train_dataset=feats, callbacks=[clock],
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    rates = [sum(tokens[s * per_step:(s + 1) * per_step]) / (clock.t[s + 1] - clock.t[s]) for s in range(len(clock.t) - 1)]
    res = {"row": row, "tokens_per_s": rates, "losses": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
           "train_s": clock.t[-1] - clock.t[0] if clock.t else None, "versions": versions(row)}
    (work / f"{row}.json").write_text(json.dumps(res))
    return res


def versions(row: str) -> dict[str, str]:
    import peft
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    if row == "trl":
        import datasets
        import trl

        out.update(trl=trl.__version__, datasets=datasets.__version__)
    if row == "liger":
        from importlib.metadata import version

        out["liger_kernel"] = version("liger-kernel")
    return out


if __name__ == "__main__":
    run_row(*sys.argv[1:4])
