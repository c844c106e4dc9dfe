"""Thin command line over `lorafit.api`: parse arguments, call the API, print, map errors to exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import rundir as R
from .errors import LorafitError


def _parser() -> argparse.ArgumentParser:
    from .config import config_help

    p = argparse.ArgumentParser(prog="lorafit", description="LoRA fine-tuning that tells you whether it worked.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train (or resume) a LoRA adapter", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="lorafit train CONFIG.yaml [--key=value ...]\n\nconfig keys:\n" + config_help())
    t.add_argument("config", help="YAML config file")
    t.add_argument("--nproc", type=int, default=None,
                   help="launch on N processes/GPUs through torchrun; batch_size is per process, so the global batch "
                        "is batch_size x gradient_accumulation_steps x N (as in HF Trainer and LLaMA-Factory)")
    t.add_argument("--no-progress", action="store_true")

    g = sub.add_parser("generate", help="greedy answer of a run's tuned model to one prompt")
    g.add_argument("--run", required=True)
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--base", action="store_true", help="answer with the base model instead")

    m = sub.add_parser("merge", help="merge the adapter into a full safetensors model")
    m.add_argument("--run", required=True)
    m.add_argument("--out", required=True)

    e = sub.add_parser("eval", help="ROUGE/BLEU before and after fine-tuning on every validation set")
    e.add_argument("run", nargs="?", default=None, help="a lorafit run folder (or use --model/--adapter/--val/--out)")
    e.add_argument("--model", default=None, help="base model of a PEFT adapter trained elsewhere (folder or hub id)")
    e.add_argument("--adapter", default=None, help="PEFT adapter folder (LLaMA-Factory saves/..., HF checkpoint-N, ...)")
    e.add_argument("--val", action="append", default=None, metavar="NAME=FILE", help="a validation set (repeatable)")
    e.add_argument("--general", default=None, metavar="FILE", help="general-domain set, for forgetting")
    e.add_argument("--out", default=None, help="output folder for --adapter (FOLDER/eval lets `lorafit report FOLDER` find it)")
    e.add_argument("--max-new-tokens", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--max-samples", type=int, default=None)
    e.add_argument("--mode", choices=["llamafactory", "standard"], default=None)
    e.add_argument("--sets", nargs="+", default=None, help="only these validation sets (names as in log.jsonl)")
    e.add_argument("--device", default="auto")
    e.add_argument("--flips", type=int, default=10, metavar="N", help="most improved / regressed prompts listed per set")
    e.add_argument("--checkpoints", action="store_true",
                   help="evaluate every kept checkpoint and the best/final adapters (eval/checkpoints.json, .md, .png)")
    e.add_argument("--select", action="store_true", help="pick the best checkpoint within forgetting_budget and "
                   "export RUN/selected-adapter/ (reuses eval/checkpoints.json unless --checkpoints)")
    e.add_argument("--benchmarks", default=None, metavar="PATH,...", help="multiple-choice benchmark folders "
                   "(MMLU/CMMLU layout) scored before vs after (default: the config's benchmarks)")
    e.add_argument("--shots", default="0", metavar="K,...", help="exemplars per benchmark prompt, e.g. 0,5 (default 0)")

    s = sub.add_parser("score", help="score a predictions file (prompt/predict/label JSON lines)")
    s.add_argument("predictions")
    s.add_argument("--mode", choices=["llamafactory", "standard"], default="llamafactory")
    s.add_argument("--lang", choices=["en", "zh"], default=None)
    s.add_argument("--json", action="store_true")

    d = sub.add_parser("diagnose", help="find what went wrong in a run and write the fix")
    d.add_argument("run", help="lorafit run folder, LLaMA-Factory / HF Trainer output or checkpoint folder, or a log file")
    d.add_argument("--write-config", default=None, help="write the patched config here (in the run's tool's keys)")
    d.add_argument("--config", default=None, help="the YAML the run was launched with (LLaMA-Factory's, for its runs)")

    r = sub.add_parser("report", help="report.html + report.md for a run")
    r.add_argument("run")
    r.add_argument("--study", default=None, help="a blind-test study database to include")

    b = sub.add_parser("blind", help="human blind test of base vs tuned answers")
    bs = b.add_subparsers(dest="blind_cmd", required=True)
    bc = bs.add_parser("create")
    bc.add_argument("--a", default=None, help="predictions file of model A")
    bc.add_argument("--b", default=None, help="predictions file of model B")
    bc.add_argument("--run", default=None, help="take base vs tuned predictions from this run's eval/")
    bc.add_argument("--set", default=None, help="with --run: the validation set's name")
    bc.add_argument("--raters", type=int, required=True)
    bc.add_argument("--out", required=True)
    bc.add_argument("--base-url", default="http://127.0.0.1:8765")
    bc.add_argument("--seed", type=int, default=0, help="layout seed (mixed with a per-study secret salt)")
    bv = bs.add_parser("serve")
    bv.add_argument("db")
    bv.add_argument("--host", default="127.0.0.1")
    bv.add_argument("--port", type=int, default=8765)
    br = bs.add_parser("results")
    br.add_argument("db")
    br.add_argument("--json", action="store_true")
    br.add_argument("--plot", default=None)

    dm = sub.add_parser("demo", help="the built-in default job: fine-tune SmolLM2-135M on a demo set")
    dm.add_argument("--out", default="runs/demo")
    return p


def _torchrun(n: int, argv: list[str]) -> int:
    """Run `lorafit train` on n processes through torchrun's launcher, in this process.

    Each worker prints its own error only on rank 0 (`main`), and the launcher's failure report (one
    traceback per rank) is caught here: a config or data error is one line and exit status 2; any
    other worker failure (a crash, the dist_timeout watchdog) is exit status 1.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    rest = [a for i, a in enumerate(argv) if not a.startswith("--nproc") and not (i > 0 and argv[i - 1] == "--nproc")]
    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={n}", "--module", "lorafit", *rest])
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        return 2 if 2 in codes else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="lorafit: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _run(args, extra, argv)
    except LorafitError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails alike: say it once
            print(f"lorafit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lorafit ... | head`
        sys.stderr.close()
        return 0


def _run(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from . import api

    if args.cmd == "train":
        from .config import load_config

        cfg = load_config(args.config, extra)  # validate before anything is launched or loaded
        if args.nproc is not None and args.nproc < 1:
            from .errors import ConfigError

            raise ConfigError(f"must be a number of processes >= 1, got {args.nproc}", field="--nproc")
        if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return _torchrun(args.nproc, argv)
        if args.no_progress:  # no bar at all: transformers' own (loading weights) included
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        res = api.train(cfg, progress=not args.no_progress, config_path=args.config)
        print(f"run folder: {res.run_dir}\n  adapter: {res.run_dir / R.ADAPTER}\n  log: {res.run_dir / R.LOG}"
              f"\n  loss curves: {res.run_dir / R.LOSS_PLOT}")
    elif args.cmd == "generate":
        print(api.generate(args.run, args.prompt, max_new_tokens=args.max_new_tokens, base_only=args.base))
    elif args.cmd == "merge":
        print(f"merged model: {api.merge(args.run, args.out)}")
    elif args.cmd == "eval" and (args.adapter or args.model or args.val or args.out):
        api.evaluate_adapter(*_foreign_eval_args(args), general=args.general, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, max_samples=args.max_samples, mode=args.mode, device=args.device)
        print((Path(args.out) / R.METRICS_MD).read_text(encoding="utf-8"))
    elif args.cmd == "eval":
        if args.run is None:
            from .errors import ConfigError

            raise ConfigError("give a run folder, or --model, --adapter, --val NAME=FILE and --out", field="run")
        if args.flips < 0:
            from .errors import ConfigError

            raise ConfigError(f"must be 0 or more, got {args.flips}", field="--flips")
        bench = {} if args.benchmarks is None else {"benchmarks": [b for b in args.benchmarks.split(",") if b]}
        api.evaluate(args.run, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     max_samples=args.max_samples, mode=args.mode, sets=args.sets, device=args.device,
                     flips=args.flips, checkpoints=args.checkpoints, select=args.select,
                     shots=_shots(args.shots), **bench)
        md = R.CHECKPOINTS_MD if args.checkpoints or args.select else R.METRICS_MD
        print((Path(args.run) / R.EVAL_DIR / md).read_text(encoding="utf-8"))
    elif args.cmd == "score":
        res = api.score(args.predictions, mode=args.mode, lang=args.lang)
        health = {k: v for k, v in res["health"].items() if k != "examples"}
        if args.json:
            print(json.dumps({**{k: res[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}, "health": health}))
        else:
            print("  ".join(f"{k}: {res[k]:.2f}" for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")))
            print("health: " + "  ".join(f"{k}: {'–' if v is None else round(v, 3)}" for k, v in health.items()))
    elif args.cmd == "diagnose":
        from .diagnosis import format_findings

        findings = api.diagnose(args.run, write_config=args.write_config, config=args.config)
        print(format_findings(findings))
        if args.write_config:
            print(f"patched config: {args.write_config}")
    elif args.cmd == "report":
        html, md = api.report(args.run, study=args.study)
        print(f"report: {html}\n        {md}")
    elif args.cmd == "blind":
        return _blind(args)
    elif args.cmd == "demo":
        res = api.demo(args.out)
        d = res["run_dir"]
        print(f"\ndemo finished. outputs in {d}:\n  adapter/     PEFT adapter\n  log.jsonl    training log"
              f"\n  loss.png     loss curves\n  eval/metrics.md  ROUGE/BLEU before vs after\n  diagnosis.json"
              f"\n  report.html  everything in one page")
    return 0


def _shots(text: str) -> list[int]:
    """--shots 0,5 -> [0, 5]; anything else is one line, exit 2."""
    try:
        shots = [int(k) for k in text.split(",")]
    except ValueError:
        shots = []
    if not shots or min(shots) < 0:
        from .errors import ConfigError

        raise ConfigError(f"expected numbers >= 0 separated by commas (e.g. 0,5), got {text!r}", field="--shots")
    return shots


def _foreign_eval_args(args: argparse.Namespace) -> tuple[str, str, dict[str, str], str]:
    """--model/--adapter/--val/--out of `lorafit eval` for an adapter without a run folder, checked."""
    from .errors import ConfigError

    if args.run is not None:
        raise ConfigError("give either a run folder or --model/--adapter, not both", field="run")
    for name in ("model", "adapter", "val", "out"):
        if not getattr(args, name):
            raise ConfigError("is required to evaluate an adapter without a run folder", field=f"--{name}")
    val: dict[str, str] = {}
    for item in args.val:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"must look like NAME=FILE, got {item!r}", field="--val")
        if name.strip() in val or name.strip() == "general":
            raise ConfigError(f"set name {name.strip()!r} used twice (or 'general', which --general names)", field="--val")
        val[name.strip()] = path.strip()
    return args.model, args.adapter, val, args.out


def _blind(args: argparse.Namespace) -> int:
    from . import blind

    if args.blind_cmd == "create":
        if args.run:
            info = blind.create_study_from_run(args.run, args.set, raters=args.raters, out=args.out, seed=args.seed)
        else:
            if not (args.a and args.b):
                from .errors import ConfigError

                raise ConfigError("give --a and --b prediction files, or --run (and --set)", field="--a/--b")
            info = blind.create_study(args.a, args.b, raters=args.raters, out=args.out, seed=args.seed)
        print(info.format(args.base_url))
    elif args.blind_cmd == "serve":
        blind.serve(args.db, host=args.host, port=args.port)
    elif args.blind_cmd == "results":
        res = blind.results(args.db)
        if args.plot:
            blind.results_plot(res, args.plot)
        print(json.dumps(res, indent=1, ensure_ascii=False) if args.json else blind.results_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
