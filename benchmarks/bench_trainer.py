"""`lorafit train` end to end against HF Trainer + PEFT (the engine under LLaMA-Factory), same model, data,
data order and settings, on one GPU.

    python benchmarks/bench_nproc.py prepare              # here: Bitext, 800 examples (benchmarks/data-nproc)
    python benchmarks/bench_trainer.py --out DIR [--steps 40] [--rows hf,lorafit-eager,lorafit]

Model: a random-weight Llama-3-8B-shape folder (bf16, SmolLM2's tokenizer; bench_nproc.build_model).
Settings: the write-up's (batch 2, max_length 1024, LoRA r16/alpha 32/dropout 0.1 on all linear layers,
lr 1e-4, warmup 20 steps then cosine), no validation, logging every step.
Rows:
- `hf`: transformers' Trainer + PEFT, bf16, SDPA, `adamw_torch_fused`, `DataCollatorForSeq2Seq`, fed
  lorafit's own tokenised examples in lorafit's data order (a sequential sampler), so both see the same
  micro-batches;
- `lorafit-eager`: `lorafit train` with `fused_kernels: false` (the eager HF + PEFT step);
- `lorafit`: `lorafit train` with its defaults (fused kernels, the bucketed CUDA-graph step).
Tokens/s counts non-padding tokens; each row's figure is the median per-step rate over the second half
of the steps (the first include CUDA's warm-up and graph captures). Peak memory: max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_nproc import build_model  # noqa: E402

HF_SCRIPT = r'''
import json, sys, time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from lorafit.config import load_config
from lorafit import data as D
from lorafit.model import load_tokenizer
from lorafit.training.batches import Stream

cfg = load_config(sys.argv[1]); out = sys.argv[2]; steps = cfg.max_steps
tok = D.ensure_template(load_tokenizer(cfg.model), cfg.template)
enc = D.encode_all(tok, D.build_datasets(cfg).train, cfg)
stream = Stream(enc, cfg.batch_size, cfg.seed, tok.pad_token_id)
order = [i for k in range(steps * cfg.gradient_accumulation_steps) for i in stream.indices(k)]  # lorafit's order
rows = [{"input_ids": enc.input_ids[i], "attention_mask": [1] * len(enc.input_ids[i]), "labels": enc.labels[i]} for i in order]
tokens = [len(r["input_ids"]) for r in rows]

class InOrder(Trainer):
    def _get_train_sampler(self, *a, **k):
        return torch.utils.data.SequentialSampler(self.train_dataset)

class Clock(TrainerCallback):
    def __init__(self): self.t = []
    def on_step_begin(self, args, state, control, **kw):
        if not self.t: torch.cuda.synchronize(); self.t.append(time.perf_counter())
    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize(); self.t.append(time.perf_counter())

model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                         target_modules="all-linear", task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=steps,
                         gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
                         warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine", bf16=True, optim="adamw_torch_fused",
                         logging_steps=1, save_strategy="no", report_to=[], seed=cfg.seed, max_grad_norm=cfg.max_grad_norm,
                         dataloader_num_workers=0, remove_unused_columns=False)
clock = Clock()
torch.cuda.reset_peak_memory_stats()
tr = InOrder(model=model, args=args, train_dataset=rows, callbacks=[clock],
             data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
tr.train()
per_step = cfg.batch_size * cfg.gradient_accumulation_steps
rates = [sum(tokens[s * per_step:(s + 1) * per_step]) / (clock.t[s + 1] - clock.t[s]) for s in range(len(clock.t) - 1)]
losses = [(h["step"], h["loss"]) for h in tr.state.log_history if "loss" in h]
json.dump({"tokens_per_s": rates, "losses": losses, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
           "train_s": clock.t[-1] - clock.t[0]}, open(out + "/hf.json", "w"))
'''


def second_half_median(xs: list[float]) -> float | None:
    xs = xs[len(xs) // 2:]
    return statistics.median(xs) if xs else None


def run_row(name: str, cfg: dict, out: Path) -> dict:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    if name == "hf":
        work = Path("/tmp/bench-trainer/hf")
        work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", HF_SCRIPT, str(path), str(work)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        res = json.loads((work / "hf.json").read_text()) if (work / "hf.json").is_file() else {}
        row = {"command": "HF Trainer + PEFT (benchmarks/bench_trainer.py HF_SCRIPT)", "losses": res.get("losses"),
               "tokens_per_s": second_half_median(res.get("tokens_per_s", [])), "peak_memory_gib": res.get("peak_memory_gib")}
    else:
        cmd = [sys.executable, "-m", "lorafit", "train", str(path), "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        recs = [json.loads(ln) for ln in (Path(cfg["output_dir"]) / "log.jsonl").read_text().splitlines()] \
            if (Path(cfg["output_dir"]) / "log.jsonl").is_file() else []
        end = next((x for x in recs if x.get("event") == "end"), {})
        row = {"command": f"lorafit train {path.name}", "losses": [(x["step"], x["loss"]) for x in recs if x["type"] == "train"],
               "tokens_per_s": second_half_median([x["tokens_per_s"] for x in recs if x["type"] == "train"]),
               "peak_memory_gib": end.get("peak_memory_gib"), "step": recs[0].get("step_kind") if recs else None,
               "graphs": end.get("graphs")}
    row.update(exit=r.returncode, wall_s=round(time.perf_counter() - t0, 1), stderr_tail=r.stderr[-2000:] if r.returncode else "")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "benchmarks" / "data-nproc"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", default="hf,lorafit-eager,lorafit")
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-shape")
    a = ap.parse_args()
    import peft
    import torch
    import transformers

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    build_model(Path(a.model_dir))
    base = {"model": a.model_dir, "data": [str((Path(a.data) / "train.json").resolve())], "max_steps": a.steps,
            "logging_steps": 1, "eval_steps": 10 ** 6, "save_steps": 10 ** 6, "seed": 0, "device": "cuda"}
    cfgs = {"hf": {**base, "output_dir": "/tmp/bench-trainer/hf-cfg"},
            "lorafit-eager": {**base, "fused_kernels": False, "output_dir": "/tmp/bench-trainer/eager"},
            "lorafit": {**base, "output_dir": "/tmp/bench-trainer/fast"}}
    rows = {name: run_row(name, cfgs[name], out) for name in a.rows.split(",")}
    hf = rows.get("hf", {}).get("tokens_per_s")
    res = {"what": __doc__.split("\n")[0], "steps": a.steps,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                        "gpu": torch.cuda.get_device_name(0)},
           "rows": rows, "speedup_vs_hf": {k: v["tokens_per_s"] / hf for k, v in rows.items() if hf and v.get("tokens_per_s")}}
    (out / "trainer-llama3-8b.json").write_text(json.dumps(res, indent=1))
    for k, v in rows.items():
        print(k, v["exit"], v["wall_s"], v.get("tokens_per_s"), v.get("peak_memory_gib"), v.get("step"), v.get("graphs"),
              (v["losses"] or [])[:3], (v["losses"] or [])[-2:], v["stderr_tail"][-800:])
    print(json.dumps(res["speedup_vs_hf"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
