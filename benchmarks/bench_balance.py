"""What `balance_steps` costs in loss and buys in speed on one GPU: the same run at several seeds with the
examples of a step as the shuffle cut them (0), dealt within each step (1, the dealing before session 8) and
dealt over 8 steps (the default).

    python benchmarks/bench_nproc.py prepare --out benchmarks/data-nproc     # here: needs ../shared/data
    python benchmarks/bench_balance.py --data benchmarks/data-nproc --out $OUT [--steps 200 --seeds 0 1 2]

One process, gradient_accumulation_steps 2 (the 1-GPU side of bench_nproc: global batch 4), the Llama-3-8B
shape with random bf16 weights (bench_nproc.build_model), Bitext, the write-up's settings, validation on.
Dealing changes which examples share a step, so two settings give different curves; the question is whether
the difference is larger than what another seed (another shuffle) gives.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_nproc as B  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(B.ROOT / "benchmarks" / "data-nproc"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--windows", type=int, nargs="+", default=[0, 1, 8])
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-shape")
    ap.add_argument("--timeout", type=float, default=240)
    a = ap.parse_args()
    out, data = Path(a.out), Path(a.data)
    out.mkdir(parents=True, exist_ok=True)
    B.build_model(Path(a.model_dir))
    runs = []
    for seed in a.seeds:
        for w in a.windows:
            cfg = {"model": a.model_dir, "data": [str((data / "train.json").resolve())],
                   "val_data": {"bitext": str((data / "val.json").resolve())}, "max_steps": a.steps,
                   "eval_steps": a.steps // 4, "logging_steps": 5, "save_steps": a.steps, "seed": seed, "device": "cuda",
                   "eval_batch_size": 8, "gradient_accumulation_steps": 2, "balance_steps": w,
                   "output_dir": f"/tmp/balance/s{seed}-w{w}"}
            shutil.rmtree(cfg["output_dir"], ignore_errors=True)  # a finished run there would be taken as done
            r = B.train(f"s{seed}-w{w}", cfg, out, 1, a.timeout)
            last = [loss for _, loss in r["train"][-10:]]
            runs.append({"seed": seed, "balance_steps": w, "exit": r["exit"], "command": r["command"], "config": cfg,
                         "final_eval_loss": r["eval"][-1][2] if r["eval"] else None, "eval": r["eval"],
                         "train_loss_last_50_steps": statistics.mean(last) if last else None,
                         "tokens_per_s_median": r["tokens_per_s_median"], "train": r["train"]})
            print(seed, w, r["exit"], runs[-1]["final_eval_loss"], runs[-1]["tokens_per_s_median"], flush=True)
    summary = {}
    for w in a.windows:
        mine = [r for r in runs if r["balance_steps"] == w and r["final_eval_loss"] is not None]
        summary[w] = {"final_eval_loss": [r["final_eval_loss"] for r in mine],
                      "mean_final_eval_loss": statistics.mean(r["final_eval_loss"] for r in mine) if mine else None,
                      "median_tokens_per_s": statistics.median(r["tokens_per_s_median"] for r in mine) if mine else None}
    import torch
    res = {"what": "balance_steps 0 / 1 / 8 at several seeds, 1 GPU, gradient_accumulation_steps 2, Llama-3-8B shape "
                   "(random bf16 weights), Bitext", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "command": "python benchmarks/bench_balance.py " + " ".join(sys.argv[1:]), "summary": summary, "runs": runs}
    (out / "balance-llama3-8b.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
