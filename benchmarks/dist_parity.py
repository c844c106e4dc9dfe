"""Loss parity of `lorafit train` on 1 process against 2 processes under DDP and under FSDP.

    python benchmarks/dist_parity.py --model MODEL --data train.json --out DIR [--steps 100] [--set key=value ...]

Three runs of the same config at the same global batch (gradient_accumulation_steps 2: one process
does both micro-batches, two processes one each): 1 process, 2 processes `distributed: ddp`,
2 processes `distributed: fsdp`, launched as `lorafit train CONFIG --nproc N`. Their logged train
losses (logging_steps 1) are compared step by step with the 1-process run: the max and mean relative
difference, target within 2 %. Exact equality is not expected: float reduction order differs, and
LoRA dropout draws its masks from each rank's own generator, so the dropout noise differs (pass
`--set lora_dropout=0` to take it out). Writes DIR/dist-parity.json; the run folders stay in DIR.
Runs on CPU with a tiny model too (`--set device=cpu`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

TARGET = 0.02


def run_train(cfg: dict[str, Any], name: str, out: Path, nproc: int) -> dict[str, Any]:
    run = out / name
    if run.exists():
        shutil.rmtree(run)  # a stale finished run would be taken as done
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(run)}))
    cmd = [sys.executable, "-m", "lorafit", "train", str(path), "--no-progress"] + ([f"--nproc={nproc}"] if nproc > 1 else [])
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        print(r.stderr[-4000:], file=sys.stderr)
        return {"error": f"exit {r.returncode}", "wall_s": wall}
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    start = next(r for r in recs if r.get("event") == "start")
    losses = {r["step"]: r["loss"] for r in recs if r["type"] == "train"}
    tps = [r["tokens_per_s"] for r in recs if r["type"] == "train"]
    print(f"{name}: {len(losses)} logged steps, {wall:.0f} s, final loss {losses[max(losses)]:.4f}", flush=True)
    return {"wall_s": wall, "world_size": start["world_size"], "distributed": start.get("distributed"),
            "device": start.get("device"), "losses": losses,
            "tokens_per_s_median": sorted(tps)[len(tps) // 2] if tps else None}


def compare(ref: dict[int, float], other: dict[int, float]) -> dict[str, Any]:
    steps = sorted(set(ref) & set(other))
    rel = [abs(other[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in steps]
    worst = max(range(len(rel)), key=rel.__getitem__)
    return {"steps_compared": len(steps), "missing_steps": sorted(set(ref) ^ set(other)),
            "max_rel_diff": rel[worst], "max_rel_diff_step": steps[worst], "mean_rel_diff": sum(rel) / len(rel),
            "final_loss": other[steps[-1]], "final_loss_ref": ref[steps[-1]],
            "within_target": max(rel) <= TARGET and not set(ref) ^ set(other)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model: HF folder, .gguf or hub id")
    ap.add_argument("--data", required=True, nargs="+", help="training data file(s)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--strategies", default="ddp,fsdp")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config keys (YAML values)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {"model": args.model, "data": [str(Path(d).resolve()) for d in args.data],
                           "max_steps": args.steps, "batch_size": 4, "gradient_accumulation_steps": args.nproc,
                           "logging_steps": 1, "save_steps": args.steps + 1, "eval_steps": args.steps + 1,
                           "learning_rate": 2e-4, "max_length": 512, "seed": 0}
    for kv in args.set:
        k, _, v = kv.partition("=")
        cfg[k] = yaml.safe_load(v)
    t0 = time.perf_counter()
    runs = {"one": run_train(cfg, "one", out, 1)}
    for s in args.strategies.split(","):
        # batch_size is per device: N processes with 1/N of the accumulation keep the global batch
        runs[f"{s}-{args.nproc}"] = run_train({**cfg, "distributed": s, "gradient_accumulation_steps": 1},
                                              f"{s}-{args.nproc}", out, args.nproc)
    ref = runs["one"].get("losses")
    result = {"config": cfg, "target_max_rel_diff": TARGET, "total_s": time.perf_counter() - t0,
              "runs": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in runs.items()},
              "parity": {k: compare(ref, v["losses"]) if ref and "losses" in v else {"error": v.get("error", "no ref")}
                         for k, v in runs.items() if k != "one"},
              "losses": {k: v.get("losses") for k, v in runs.items()}}
    (out / "dist-parity.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["parity"], indent=1))
    sys.exit(0 if all(p.get("within_target") for p in result["parity"].values()) else 1)


if __name__ == "__main__":
    main()
