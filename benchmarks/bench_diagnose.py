"""Benchmark of `lorafit diagnose` on synthetic logs with planted problems.

    python benchmarks/bench_diagnose.py [--seed 0] [--seeds 1] [--per-kind 25] [--healthy 60]

Generates the suite (lorafit.diagnosis.synthetic: exponential-decay losses with per-example log-normal
noise, varied lengths, logging/eval intervals, batch sizes, noise levels, schedules and seeds; 10% of
logs without lr/grad_norm, 10% without a config), runs `diagnose_records` on each log and prints
precision and recall per kind. A kind counts as detected when a finding of that kind has severity
warning or critical ("info" is an observation, not a diagnosis). Also checks that the requested spike
steps (200, 400, 1400, 2000) are reported within one logging interval, and where planted overfitting
(10 runs with onset at steps 3200-3400) puts its best step. `--seeds N` repeats the suite with N
seeds and adds the counts up. Writes benchmarks/results/diagnose.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from lorafit.diagnosis import diagnose_records
from lorafit.diagnosis.synthetic import SCORED_KINDS, SyntheticRun, benchmark_suite

FIXED_SPIKES = [200, 400, 1400, 2000]


def score(runs: list[SyntheticRun], tally: Counter, counts: dict[str, Counter], errors: list[dict]) -> None:
    """Diagnose every run and add its outcome to the tallies."""
    for i, run in enumerate(runs):
        findings = diagnose_records(run.records, run.metrics, run.config)
        found = {f.kind for f in findings if f.severity != "info"}
        tally["info_on_healthy"] += not run.truth and any(f.severity == "info" for f in findings)
        for k in SCORED_KINDS:
            key = ("tp" if k in found else "fn") if k in run.truth else ("fp" if k in found else "tn")
            counts[k][key] += 1
            if key in ("fp", "fn"):
                errors.append({"run": i, "kind": k, "error": key, "truth": sorted(run.truth), "found": sorted(found),
                               "params": {p: v for p, v in run.params.items() if p != "true_val"}})
        L, M = run.params["logging_steps"], run.params["eval_steps"]
        if run.spike_steps:
            reported = [p["step"] for f in findings if f.kind == "fluctuation" for p in f.evidence.get("spikes", [])]
            hits = sum(any(abs(r - s) <= L for r in reported) for s in run.spike_steps)
            tally["spikes_planted"] += len(run.spike_steps)
            tally["spikes_found"] += hits
            tally["spikes_extra"] += sum(not any(abs(r - s) <= L for s in run.spike_steps) for r in reported)
            if run.spike_steps == FIXED_SPIKES:
                tally["fixed_spikes_planted"] += 4
                tally["fixed_spikes_found"] += hits
        if run.best_step is not None:
            best = [f.evidence["best_step"] for f in findings if f.kind == "overfitting"]
            fixed = 3200 <= run.params.get("overfit_onset", 0) <= 3400
            tally["overfit_planted"] += 1
            tally["overfit_fixed_planted"] += fixed
            if best:
                tv = run.params["true_val"]
                tally["best_within_2_evals"] += abs(best[0] - run.best_step) <= 2 * M
                tally["best_within_0.5pct"] += tv[best[0]] / tv[run.best_step] - 1 <= 0.005
                tally["overfit_fixed_in_range"] += fixed and 3200 - M <= best[0] <= 3400 + 2 * M


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="repeat with this many consecutive seeds")
    ap.add_argument("--per-kind", type=int, default=25)
    ap.add_argument("--healthy", type=int, default=60)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "diagnose.json"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    tally: Counter = Counter()
    counts = {k: Counter() for k in SCORED_KINDS}
    errors: list[dict] = []
    n_logs = n_healthy = 0
    for seed in range(args.seed, args.seed + args.seeds):
        runs = benchmark_suite(seed, args.per_kind, args.healthy)
        n_logs += len(runs)
        n_healthy += sum(not r.truth for r in runs)
        before = len(errors)
        score(runs, tally, counts, errors)
        for e in errors[before:]:
            e["seed"] = seed
    seconds = time.perf_counter() - t0

    seeds = f"seed {args.seed}" if args.seeds == 1 else f"seeds {args.seed}-{args.seed + args.seeds - 1}"
    print(f"{n_logs} synthetic logs ({n_healthy} healthy), {seeds}; generated and diagnosed in {seconds:.1f}s\n")
    print(f"{'kind':18s} {'planted':>7s} {'TP':>5s} {'FP':>4s} {'FN':>4s} {'precision':>9s} {'recall':>7s}")
    table, ok = {}, True
    for k in SCORED_KINDS:
        c = counts[k]
        prec = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 1.0
        rec = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 1.0
        ok &= prec >= 0.95 and rec >= 0.95
        table[k] = {"planted": c["tp"] + c["fn"], "tp": c["tp"], "fp": c["fp"], "fn": c["fn"], "tn": c["tn"],
                    "precision": round(prec, 4), "recall": round(rec, 4)}
        print(f"{k:18s} {c['tp'] + c['fn']:7d} {c['tp']:5d} {c['fp']:4d} {c['fn']:4d} {prec:9.3f} {rec:7.3f}")
    t = tally
    print(f"\nspike steps found (±1 logging interval): {t['spikes_found']}/{t['spikes_planted']}; "
          f"extra spikes reported: {t['spikes_extra']}")
    print(f"requested spike steps 200/400/1400/2000: {t['fixed_spikes_found']}/{t['fixed_spikes_planted']}")
    print(f"overfitting best step: within 2 eval intervals of the true best {t['best_within_2_evals']}/"
          f"{t['overfit_planted']}; true val there within 0.5% of the true best {t['best_within_0.5pct']}/"
          f"{t['overfit_planted']}; onset 3200-3400 runs with best step in [3200-M, 3400+2M]: "
          f"{t['overfit_fixed_in_range']}/{t['overfit_fixed_planted']}")
    print(f"healthy logs with an info-level observation (not counted as detections): {t['info_on_healthy']}/{n_healthy}")
    result = {"seeds": list(range(args.seed, args.seed + args.seeds)), "n_logs": n_logs, "healthy_logs": n_healthy,
              "seconds": round(seconds, 2), "per_kind": table, "checks": dict(tally), "errors": errors[:100],
              "pass": bool(ok)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'PASS' if ok else 'FAIL'}: precision and recall >= 0.95 for every kind; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
