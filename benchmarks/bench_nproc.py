"""`lorafit train --nproc 2` as a user runs it, against one GPU at the same global batch.

The issue "Several GPUs as a user runs them" asks: on two H200s, the write-up's settings on Bitext with
validation on, a random-weight Llama-3-8B-shape model, the 2-process run finishes, its loss curve equals
the 1-GPU run's at the same global batch within bf16 noise, and tokens/s is >= 1.9x.

    python benchmarks/bench_nproc.py prepare --out benchmarks/data-nproc     # here: needs ../shared/data
    python benchmarks/bench_nproc.py run --data benchmarks/data-nproc --out $OUT [--steps 60]   # on the GPUs

`run` builds the model folder (LlamaConfig below, bf16, SmolLM2's tokenizer from benchmarks/assets), then
runs `python -m lorafit train CFG` (1 process, gradient_accumulation_steps 2) and
`python -m lorafit train CFG --nproc 2` (gradient_accumulation_steps 1): global batch 4 both. Tokens/s is
lorafit's own log figure (non-padding tokens), the median of the train records of the second half
(the first windows include CUDA's and the allocator's warm-up).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "benchmarks" / "assets" / "smollm2-tokenizer"
LLAMA3_8B = dict(vocab_size=49152, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192)


def prepare(shared: Path, out: Path, n_train: int, n_val: int) -> None:
    with open(shared / "domain/bitext-support-en/Bitext_Sample_Customer_Support_Training_Dataset.csv", encoding="utf-8") as f:
        rows = [{"instruction": r["instruction"], "output": r["response"]} for r in csv.DictReader(f)]
    random.Random(0).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(rows[:n_train], ensure_ascii=False), encoding="utf-8")
    (out / "val.json").write_text(json.dumps(rows[n_train:n_train + n_val], ensure_ascii=False), encoding="utf-8")
    print(f"wrote {out}: {n_train} train, {n_val} validation")


def build_model(dst: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (dst / "config.json").is_file():
        return
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, torch_dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(dst, safe_serialization=True)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, dst / f.name)
    del model
    torch.cuda.empty_cache()


def train(name: str, cfg: dict, out: Path, nproc: int, timeout: float | None) -> dict:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "lorafit", "train", str(path), "--no-progress"] + (["--nproc", str(nproc)] if nproc > 1 else [])
    t0 = time.perf_counter()
    # stderr goes to a file as it comes (a hung run leaves its log behind); a run past --timeout is killed
    # with its whole process group (torchrun's workers included)
    err = out / f"{name}.stderr"
    with err.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
    wall = time.perf_counter() - t0
    run = Path(cfg["output_dir"])
    recs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()] if (run / "log.jsonl").is_file() else []
    train_recs = [r for r in recs if r["type"] == "train"]
    tps = [r["tokens_per_s"] for r in train_recs[len(train_recs) // 2:]]  # steady state: the second half
    return {"command": " ".join(["lorafit", "train", path.name, "--no-progress"] + (["--nproc", str(nproc)] if nproc > 1 else [])),
            "config": cfg, "exit": code, "wall_s": round(wall, 1), "stderr_tail": err.read_text()[-1500:],
            "start": recs[0] if recs else None,
            "train": [(r["step"], r["loss"]) for r in train_recs], "eval": [(r["step"], r["split"], r["eval_loss"]) for r in recs if r["type"] == "eval"],
            "tokens_per_s": [r["tokens_per_s"] for r in train_recs],
            "tokens_per_s_median": statistics.median(tps) if tps else None}


def run(data: Path, out: Path, steps: int, model_dir: Path, timeout: float | None, overrides: dict | None = None) -> None:
    import peft
    import torch
    import transformers

    shutil.rmtree("/tmp/nproc", ignore_errors=True)  # a finished run there would be taken as done
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_model(model_dir)
    built = time.perf_counter() - t0
    base = {"model": str(model_dir), "data": [str((data / "train.json").resolve())],
            "val_data": {"bitext": str((data / "val.json").resolve())}, "max_steps": steps, "eval_steps": steps // 3,
            "logging_steps": 5, "save_steps": steps, "seed": 0, "device": "cuda", "eval_batch_size": 8, **(overrides or {})}
    one = train("one-gpu", {**base, "gradient_accumulation_steps": 2, "output_dir": "/tmp/nproc/one"}, out, 1, timeout)
    two = train("two-gpus", {**base, "gradient_accumulation_steps": 1, "output_dir": "/tmp/nproc/two"}, out, 2, timeout)
    rel = [abs(a[1] - b[1]) / abs(a[1]) for a, b in zip(one["train"], two["train"])]
    erel = [abs(a[2] - b[2]) / abs(a[2]) for a, b in zip(one["eval"], two["eval"])]
    res = {"what": "lorafit train --nproc 2 vs 1 GPU at the same global batch (4), Llama-3-8B shape (random bf16 weights), "
                   "Bitext, the write-up's settings", "model_shape": LLAMA3_8B, "model_build_s": round(built, 1),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                        "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()},
           "one_gpu": one, "two_gpus": two,
           "speedup": (two["tokens_per_s_median"] / one["tokens_per_s_median"]) if one["tokens_per_s_median"] and two["tokens_per_s_median"] else None,
           "train_loss_max_rel_diff": max(rel) if rel else None, "eval_loss_max_rel_diff": max(erel) if erel else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "nproc-llama3-8b.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("speedup", "train_loss_max_rel_diff", "eval_loss_max_rel_diff")}),
          one["exit"], two["exit"], one["wall_s"], two["wall_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "data-nproc"))
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--val", type=int, default=9, help="an odd size: shards of unequal length on 2 GPUs")
    r = sub.add_parser("run")
    r.add_argument("--data", default=str(ROOT / "benchmarks" / "data-nproc"))
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=60)
    r.add_argument("--model-dir", default="/tmp/llama3-8b-shape")
    r.add_argument("--timeout", type=float, default=None, help="seconds each training command may take")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key for both runs (a YAML value), e.g. balance_steps=1")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(Path(a.shared), Path(a.out), a.train, a.val)
    else:
        run(Path(a.data), Path(a.out), a.steps, Path(a.model_dir), a.timeout,
            {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
