"""lorafit's MMLU/CMMLU scorer against lm-evaluation-harness's own, on the same questions (not a test).

    PYTHONPATH=/tmp/lmeval_pkgs .venv/bin/python benchmarks/mc_lmeval_parity.py          # 2 per subject, 0- and 5-shot

lm-eval is not a lorafit dependency; install it anywhere importable (`pip install --target DIR lm-eval`
plus `datasets`, `evaluate`, `dill`, ... and put DIR on PYTHONPATH). The sample's questions and dev
exemplars are written in the layout of lm-eval's hub datasets (cais/mmlu, haonan-li/cmmlu) to a temp
folder, and for each subject a local task is made from lm-eval's *installed* task files: its
``_default_template_yaml`` (doc_to_text, choices, first_n few-shot sampler) and its per-subject yaml
(description), with only the dataset location replaced. lm-eval's HFLM then scores them with the same
in-memory model lorafit scores. Compared per question: the prompt text, the four log-likelihoods and
the predicted letter. Writes benchmarks/results/mc-lmeval-parity.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from lorafit.evaluation.benchmarks import LETTERS, build_prompt, load_benchmark, score_benchmark
from lorafit.model import builtin_model_path, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "general"


def _lm_eval_tasks(bench, tmp: Path, lm_eval_dir: Path) -> list[str]:
    """One local lm-eval task per subject: lm-eval's own template and description, our rows as its dataset."""
    family = "cmmlu" if bench.lang == "zh" else "mmlu"
    tdir = lm_eval_dir / "tasks" / family / ("" if family == "cmmlu" else "default")
    names = []
    for subject in dict.fromkeys(q.subject for q in bench.test):
        files = {}
        for split, rows in (("test", [q for q in bench.test if q.subject == subject]), ("dev", bench.dev[subject])):
            path = tmp / f"{family}-{subject}-{split}.jsonl"
            with path.open("w", encoding="utf-8") as f:
                for q in rows:
                    if family == "mmlu":  # cais/mmlu: question, subject, choices, answer (an index)
                        rec = {"question": q.question, "subject": subject, "choices": list(q.choices), "answer": q.answer}
                    else:  # haonan-li/cmmlu: Question, A-D, Answer (a letter)
                        rec = {"Question": q.question, **dict(zip("ABCD", q.choices)), "Answer": LETTERS[q.answer]}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            files[split] = str(path)
        own = yaml.safe_load((tdir / f"{family}_{subject}.yaml").read_text(encoding="utf-8"))
        task = {"include": str(tdir / "_default_template_yaml"), "task": f"lorafit_{family}_{subject}",
                "description": own["description"], "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": files}}
        (tmp / f"lorafit_{family}_{subject}.yaml").write_text(yaml.safe_dump(task, allow_unicode=True), encoding="utf-8")
        names.append(task["task"])
    return names


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-subject", type=int, default=2, help="test questions per subject (first N)")
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--benchmarks", default="mmlu-en,cmmlu-zh")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mc-lmeval-parity.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    gguf = builtin_model_path()
    tok = load_tokenizer(gguf)
    model = load_model(gguf, device="cpu", dtype="float32").eval()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    shots = [int(k) for k in args.shots.split(",")]
    report: dict = {"lm_eval_version": getattr(lm_eval, "__version__", "?"), "model": Path(gguf).name,
                    "torch_threads": torch.get_num_threads(), "benchmarks": {}}
    for name in args.benchmarks.split(","):
        bench = load_benchmark(DATA / name, shots)
        keep = {}
        for q in bench.test:
            keep.setdefault(q.subject, [])
            if len(keep[q.subject]) < args.per_subject:
                keep[q.subject].append(q)
        bench.test = [q for qs in keep.values() for q in qs]
        with tempfile.TemporaryDirectory() as d:
            tasks = _lm_eval_tasks(bench, Path(d), Path(lm_eval.__file__).parent)
            tm = TaskManager(include_path=d)
            for k in shots:
                t0 = time.perf_counter()
                ours = np.array(score_benchmark(model, tok, bench, k, batch_size=8))
                t1 = time.perf_counter()
                res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=k, task_manager=tm,
                                              log_samples=True, bootstrap_iters=0)
                t2 = time.perf_counter()
                theirs, prompts_same = [], 0
                for subject in keep:
                    samples = sorted(res["samples"][f"lorafit_{'cmmlu' if bench.lang == 'zh' else 'mmlu'}_{subject}"],
                                     key=lambda s: s["doc_id"])
                    for s, q in zip(samples, keep[subject]):
                        theirs.append([float(r[0][0]) for r in s["resps"]])
                        prompts_same += all(a[0] == build_prompt(bench, q, k) for a in s["arguments"])
                theirs = np.array(theirs)
                row = {"questions": len(ours), "prompts_identical": int(prompts_same),
                       "same_prediction": int((ours.argmax(1) == theirs.argmax(1)).sum()),
                       "max_abs_loglik_diff": float(np.abs(ours - theirs).max()),
                       "acc_lorafit": float(np.mean(ours.argmax(1) == [q.answer for q in bench.test])),
                       "acc_lm_eval": float(np.mean(theirs.argmax(1) == [q.answer for q in bench.test])),
                       "seconds_lorafit": round(t1 - t0, 1), "seconds_lm_eval": round(t2 - t1, 1)}
                report["benchmarks"][f"{name} {k}-shot"] = row
                print(name, f"{k}-shot", json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
