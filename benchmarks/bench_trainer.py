"""`lorafit train` end to end against HF Trainer + PEFT (the engine under LLaMA-Factory), Liger Kernel and
TRL's SFTTrainer: same model, data, data order and settings, on one GPU.

    python benchmarks/bench_nproc.py prepare              # here: Bitext, 800 examples (benchmarks/data-nproc)
    bash benchmarks/device_bench.sh wheels                # here: TRL, Liger Kernel and their missing deps as wheels
    bash benchmarks/device_bench.sh trainer --out $OUT --steps 40     # on the GPU: install them, then this script
    python benchmarks/bench_trainer.py --out DIR [--steps 40] [--rows hf,trl,liger,lorafit-eager,lorafit]

Model: a random-weight Llama-3-8B-shape folder (bf16, SmolLM2's tokenizer; bench_nproc.build_model).
Settings: the write-up's (batch 2, max_length 1024, LoRA r16/alpha 32/dropout 0.1 on all linear layers,
lr 1e-4, warmup 20 steps then cosine), no validation, logging every step.
Rows, each in a process of its own:
- `hf`: transformers' Trainer + PEFT, bf16, SDPA, `adamw_torch_fused`, `DataCollatorForSeq2Seq`
  (benchmarks/hf_rows.py), fed lorafit's own tokenised examples in lorafit's data order (a sequential
  sampler), so every row sees the same micro-batches;
- `liger`: the same with `use_liger_kernel=True` (Liger Kernel's Triton kernels patched into the model);
- `trl`: TRL's `SFTTrainer` with a PEFT `LoraConfig`, the same data, order and settings;
- `lorafit-eager`: `lorafit train` with `fused_kernels: false` (the eager HF + PEFT step);
- `lorafit`: `lorafit train` with its defaults (fused kernels, the bucketed CUDA-graph step);
- `lorafit-packing`: `lorafit train` with `packing: true` (packs of batch_size x max_length tokens: fewer,
  fuller steps, so its losses are not step for step comparable with the others).
A row whose package is not importable (trl, liger_kernel) is recorded as skipped.
Tokens/s counts non-padding tokens; each row's figure is the median per-step rate over the second half
of the steps (the first include CUDA's warm-up and graph captures). Seconds per epoch: the training
set's real tokens / that rate. Peak memory: max_memory_allocated. Losses: per step, and each row's largest
per-step relative difference from the `hf` row's (the rows draw different dropout masks).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench_nproc import build_model

ROOT = Path(__file__).resolve().parents[1]
HF_ROWS = {"hf": None, "liger": "liger_kernel", "trl": "trl"}  # row -> the package it needs beyond transformers
LORAFIT_ROWS = {"lorafit-eager": {"fused_kernels": False}, "lorafit": {}, "lorafit-packing": {"packing": True},
                "lorafit-fp8": {"quantize_base": "fp8"}}
DEFAULT_ROWS = "hf,trl,liger,lorafit-eager,lorafit,lorafit-packing"


def second_half_median(xs: list[float]) -> float | None:
    xs = xs[len(xs) // 2:]
    return statistics.median(xs) if xs else None


def run_row(name: str, cfg: dict, out: Path, work: Path) -> dict:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    if name in HF_ROWS:
        need = HF_ROWS[name]
        if need and importlib.util.find_spec(need) is None:
            return {"skipped": f"{need} is not importable here (on the GPU machine: benchmarks/device_bench.sh install)"}
        result = work / "hf-rows" / f"{name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(ROOT / "benchmarks" / "hf_rows.py"), name, str(path), str(work / "hf-rows")]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        res = json.loads(result.read_text()) if result.is_file() else {}
        row = {"command": f"python benchmarks/hf_rows.py {name} {path.name} WORK", "losses": res.get("losses"),
               "tokens_per_s": second_half_median(res.get("tokens_per_s", [])), "peak_memory_gib": res.get("peak_memory_gib"),
               "tokens_per_s_all": res.get("tokens_per_s"), "versions": res.get("versions")}
    else:
        cmd = [sys.executable, "-m", "lorafit", "train", str(path), "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log = Path(cfg["output_dir"]) / "log.jsonl"
        recs = [json.loads(ln) for ln in log.read_text().splitlines()] if log.is_file() else []
        start = next((x for x in recs if x.get("event") == "start"), {})
        end = next((x for x in recs if x.get("event") == "end"), {})
        train = [x for x in recs if x["type"] == "train"]
        row = {"command": f"lorafit train {path.name}", "losses": [(x["step"], x["loss"]) for x in train],
               "tokens_per_s": second_half_median([x["tokens_per_s"] for x in train]),
               "tokens_per_s_all": [x["tokens_per_s"] for x in train], "peak_memory_gib": end.get("peak_memory_gib"),
               "step": start.get("step_kind"), "step_fallback": start.get("step_fallback"), "graphs": end.get("graphs")}
    row.update(exit=r.returncode, wall_s=round(time.perf_counter() - t0, 1), stderr_tail=r.stderr[-2000:] if r.returncode else "")
    return row


def epoch_tokens(cfg: dict) -> int:
    """Real tokens of one epoch of the training set, as lorafit encodes it."""
    import lorafit
    from lorafit import data as D
    from lorafit.model import load_tokenizer

    conf = lorafit.load_config(None, cfg)
    tok = D.ensure_template(load_tokenizer(conf.model), conf.template)
    return sum(map(len, D.encode_all(tok, D.build_datasets(conf).train, conf).input_ids))


def compare(rows: dict, per_epoch: int) -> dict:
    """Each row against `hf`: tokens/s ratio, and the largest per-step relative loss difference."""
    hf = rows.get("hf", {})
    ref = dict(hf.get("losses") or [])
    speedup = {}
    for name, row in rows.items():
        if row.get("tokens_per_s"):
            row["s_per_epoch"] = per_epoch / row["tokens_per_s"]
            if hf.get("tokens_per_s"):
                speedup[name] = row["tokens_per_s"] / hf["tokens_per_s"]
        rel = [abs(loss - ref[s]) / abs(ref[s]) for s, loss in row.get("losses") or [] if s in ref]
        if rel and name != "hf" and name != "lorafit-packing":
            row["loss_vs_hf_max_rel_diff"] = max(rel)
    return speedup


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "benchmarks" / "data-nproc"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-shape", help="built there unless it holds a model already")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the code paths, with a small --model-dir")
    ap.add_argument("--work", default="/tmp/bench-trainer", help="run folders")
    a = ap.parse_args(argv)
    names = [n for n in a.rows.split(",") if n]
    unknown = [n for n in names if n not in HF_ROWS and n not in LORAFIT_ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; known: {DEFAULT_ROWS}")
    import peft
    import torch
    import transformers

    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    build_model(Path(a.model_dir))
    base = {"model": a.model_dir, "data": [str((Path(a.data) / "train.json").resolve())], "max_steps": a.steps,
            "logging_steps": 1, "eval_steps": 10 ** 6, "save_steps": 10 ** 6, "seed": 0, "device": a.device}
    rows = {}
    for name in names:
        run_dir = work / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a finished run there would be taken as done
        rows[name] = run_row(name, {**base, **LORAFIT_ROWS.get(name, {}), "output_dir": str(run_dir)}, out, work)
    res = {"what": __doc__.split("\n")[0], "steps": a.steps, "command": " ".join(["bench_trainer.py", *(argv or sys.argv[1:])]),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                        "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
                        **{k: v for r in rows.values() for k, v in (r.get("versions") or {}).items()}},
           "epoch_tokens": epoch_tokens(base), "rows": rows}
    res["speedup_vs_hf"] = compare(rows, res["epoch_tokens"])
    (out / "trainer-llama3-8b.json").write_text(json.dumps(res, indent=1))
    for k, v in rows.items():
        if "skipped" in v:
            print(k, "skipped:", v["skipped"])
            continue
        print(k, v["exit"], v["wall_s"], v.get("tokens_per_s"), v.get("peak_memory_gib"), v.get("step"), v.get("graphs"),
              (v["losses"] or [])[:3], (v["losses"] or [])[-2:], v["stderr_tail"][-800:])
    print(json.dumps(res["speedup_vs_hf"]))
    return res


if __name__ == "__main__":
    main()
