"""Build the tables and the gain-vs-forgetting plot of docs/results.md from results/*.json.

Regenerating docs/results.md (its prose is written by hand; every table in it is this script's output):

    .venv/bin/python experiments/tables.py > /tmp/results-tables.md    # about a minute on CPU
    .venv/bin/python experiments/tables.py --check docs/results.md      # which table rows the doc lacks

The first command also redraws docs/img/gain-vs-forgetting.png (--plot PATH to draw it elsewhere). Its
`### ...` headings say which section of docs/results.md each block belongs to; paste the blocks over the
old ones there. The second prints every table row (a line starting with "|") of the output that
docs/results.md does not contain, and exits 1 if there is any.

Every number printed comes from the JSON the runs wrote; nothing is typed in by hand. Intervals are
recomputed from the committed predictions (results/runs/<name>/eval/predictions-*.jsonl) with
lorafit's own paired bootstrap (lorafit.evaluation.stats: 2,000 resamples over prompts, seed 0): every
delta, and "gain kept" / "degradation cut" as ratios of paired deltas resampled jointly over the same
prompts (the runs answered the same test sets).
"""
from __future__ import annotations

import argparse
import json
from functools import lru_cache
from pathlib import Path

from lorafit.evaluation.metrics import ExampleStats, example_stats
from lorafit.evaluation.predictions import iter_json_objects, read_predictions
from lorafit.evaluation.stats import joint_ci, loss_stats, paired_summary
from lorafit.evaluation.table import fmt_delta

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
RUNS = Path(__file__).resolve().parents[1] / "results" / "runs"


def _row(label: str, m: dict) -> str:
    return f"| {label} | " + " | ".join(f"{m[k]:.2f}" for k in KEYS) + " |"


def _dir(run: str | Path) -> Path:
    """A run folder: a run name under results/runs/, or a path to the folder itself."""
    return run if isinstance(run, Path) else RUNS / run


@lru_cache(maxsize=None)
def set_stats(run: str | Path, name: str, mode: str = "llamafactory") -> dict[str, tuple[ExampleStats, ExampleStats]]:
    """{metric: (base, tuned)} per-prompt statistics of one set, from the committed predictions; "loss"
    too when the files carry per-prompt losses (lorafit eval writes loss_sum/loss_tokens since issue 16)."""
    files = {w: _dir(run) / "eval" / f"predictions-{w}-{name}.jsonl" for w in ("base", "tuned")}
    (pb, lb), (pt, lt) = read_predictions(files["base"]), read_predictions(files["tuned"])
    sb, st = example_stats(pb, lb, mode), example_stats(pt, lt, mode)
    out = {k: (sb[k], st[k]) for k in KEYS}
    losses = []
    for w in ("base", "tuned"):
        recs = [r for _, r in iter_json_objects(files[w])]
        if not all("loss_sum" in r and "loss_tokens" in r for r in recs):
            break
        losses.append(loss_stats([r["loss_sum"] for r in recs], [r["loss_tokens"] for r in recs]))
    if len(losses) == 2:
        out["loss"] = (losses[0], losses[1])
    return out


def _delta_row(label: str, run: str, name: str, mode: str) -> str:
    st = set_stats(run, name, mode)
    cells = []
    for k in KEYS:
        r = paired_summary(*st[k])
        cells.append(fmt_delta(r["delta"], r["delta_ci95"]))
    return f"| {label} | " + " | ".join(cells) + " |"


def writeup_table(run: dict, domain_sets: list[str]) -> list[str]:
    """The write-up's table: before, then after on each validation set (both metric modes)."""
    out = []
    for mode in ("llamafactory", "standard"):
        out += [f"\n**{run['name']}**, metric mode `{mode}`\n", "| | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 |", "|---|---:|---:|---:|---:|"]
        for s in domain_sets:
            if mode == "llamafactory":
                v = run["metrics_llamafactory"]["sets"][s]
                before, after = v["before"], v["after"]
            else:
                before, after = run["metrics_standard"][f"base-{s}"], run["metrics_standard"][f"tuned-{s}"]
            out.append(_row(f"before (base), set `{s}`", before))
            out.append(_row(f"after, set `{s}`", after))
            out.append(_delta_row(f"Δ [95% CI], set `{s}`", run["name"], s, mode))
    return out


def forgetting_table(runs: list[dict]) -> tuple[list[str], list[tuple[str, float, float]]]:
    """Domain gain against general-set degradation, each fix against the unmitigated `bitext` run, with
    95% intervals: deltas paired over each set's prompts; gain kept = Δ_fix / Δ_bitext (ROUGE-L, set
    `seen`) and degradation cut = 1 - Δloss_fix / Δloss_bitext (general set), each resampled jointly."""
    head = ["| run | Δ ROUGE-L seen | Δ ROUGE-L unseen | general loss before → after (Δ) | Δ ROUGE-L general | "
            "degradation cut | domain gain kept |", "|---|---:|---:|---|---:|---:|---:|"]
    ref = next(r for r in runs if r["name"] == "bitext")["metrics_llamafactory"]["sets"]
    ref_deg = ref["general"]["loss_after"] - ref["general"]["loss_before"]
    pts = []
    for r in runs:
        s = r["metrics_llamafactory"]["sets"]
        g = s["general"]
        deg = g["loss_after"] - g["loss_before"]
        d = {n: paired_summary(*set_stats(r["name"], n)["rouge-l"]) for n in ("seen", "unseen", "general")}
        gain = d["seen"]["delta"]
        loss_ci = ""
        if "loss" in set_stats(r["name"], "general"):
            loss_ci = fmt_delta(deg, paired_summary(*set_stats(r["name"], "general")["loss"])["delta_ci95"], 3)[len(f"{deg:+.3f}"):]
        cut, kept = "—", "—"
        if r["name"] != "bitext":
            k, kci = joint_ci([set_stats("bitext", "seen")["rouge-l"], set_stats(r["name"], "seen")["rouge-l"]],
                              lambda a, b: b / a)
            kept = _pct(k, kci)
            if "loss" in set_stats("bitext", "general") and "loss" in set_stats(r["name"], "general"):
                c, cci = joint_ci([set_stats("bitext", "general")["loss"], set_stats(r["name"], "general")["loss"]],
                                  lambda a, b: 1 - b / a)
                cut = _pct(c, cci)
            else:   # the committed predictions predate per-prompt losses: point value only
                cut = f"{100 * (1 - deg / ref_deg):.0f}% (no CI)"
        head.append(f"| {r['name']} | {fmt_delta(gain, d['seen']['delta_ci95'])} | "
                    f"{fmt_delta(d['unseen']['delta'], d['unseen']['delta_ci95'])} | "
                    f"{g['loss_before']:.3f} → {g['loss_after']:.3f} ({deg:+.3f}{loss_ci}) | "
                    f"{fmt_delta(d['general']['delta'], d['general']['delta_ci95'])} | {cut} | {kept} |")
        pts.append((r["name"], gain, deg))
    return head, pts


def _pct(v: float, ci: list[float] | None) -> str:
    return f"{100 * v:.0f}%" + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def e2e_table(run: dict) -> list[str]:
    """E2E beside the LoRA paper's GPT-2 M (LoRA) row: corpus BLEU and ROUGE-L, all references per MR."""
    std, lf = run["metrics_standard"], run["metrics_llamafactory"]["sets"]["test"]
    n = lf["n"]
    return ["| | BLEU (corpus, sacrebleu) | ROUGE-L (rouge-score, best reference) | BLEU-4 (llamafactory) | ROUGE-L (llamafactory) |",
            "|---|---:|---:|---:|---:|",
            f"| SmolLM2-135M before | {std['base-test']['bleu-4']:.2f} | {std['base-test']['rouge-l']:.2f} | "
            f"{lf['before']['bleu-4']:.2f} | {lf['before']['rouge-l']:.2f} |",
            f"| SmolLM2-135M + LoRA (lorafit) | {std['tuned-test']['bleu-4']:.2f} | {std['tuned-test']['rouge-l']:.2f} | "
            f"{lf['after']['bleu-4']:.2f} | {lf['after']['rouge-l']:.2f} |",
            f"| Δ [95% CI] | {_ci_cell(run['name'], 'test', 'standard', 'bleu-4')} | "
            f"{_ci_cell(run['name'], 'test', 'standard', 'rouge-l')} | {_ci_cell(run['name'], 'test', 'llamafactory', 'bleu-4')} | "
            f"{_ci_cell(run['name'], 'test', 'llamafactory', 'rouge-l')} |",
            "| GPT-2 M + LoRA (LoRA paper, Table 3) | 70.4 | 71.8 | | |",
            f"\n{n} meaning representations scored."]


def _ci_cell(run: str, name: str, mode: str, key: str) -> str:
    r = paired_summary(*set_stats(run, name, mode)[key])
    return fmt_delta(r["delta"], r["delta_ci95"])


def general_row(run: str) -> list[str]:
    """The general set's ROUGE-L change with its interval (llamafactory mode)."""
    return [f"\n{run}, general set: Δ ROUGE-L {_ci_cell(run, 'general', 'llamafactory', 'rouge-l')} "
            f"(p = {paired_summary(*set_stats(run, 'general')['rouge-l'])['p_value']:.3f}, paired permutation test)."]


def health_table(names: list[str]) -> list[str]:
    """Generation health of the committed predictions (no_eos needs generation-time data: not in these files)."""
    from lorafit.evaluation.predictions import health_file

    fields = ("repetition", "empty", "template_leak", "language_mismatch", "length_ratio")
    out = ["| run | set | model | " + " | ".join(fields) + " |", "|---|---|---|" + "---:|" * len(fields)]
    for run in names:
        for f in sorted((RUNS / run / "eval").glob("predictions-base-*.jsonl")):
            name = f.name[len("predictions-base-"):-len(".jsonl")]
            for w in ("base", "tuned"):
                h = health_file(RUNS / run / "eval" / f"predictions-{w}-{name}.jsonl")
                out.append(f"| {run} | {name} | {w} | " + " | ".join(f"{h[k]:.2f}" for k in fields) + " |")
    return out


def diagnosis_table(runs: dict, names: list[str]) -> list[str]:
    out = ["| run | what differs | val loss first → best (step) → last | `lorafit diagnose` |", "|---|---|---|---|"]
    for n in names:
        r = runs[n]
        c = r["config"]
        what = ", ".join(f"{k}={c[k]}" for k in ("learning_rate", "warmup_steps", "max_grad_norm", "max_samples", "num_epochs")
                         if k in c)
        split = next(iter(sorted(r["eval_loss"])))
        ev = r["eval_loss"][split]
        best = min(ev, key=lambda t: t[1])
        diag = json.loads((Path(r["_dir"]) / "diagnosis.json").read_text())
        fs = diag if isinstance(diag, list) else diag.get("findings", [])
        found = "; ".join(f"{f['severity']} {f['kind']}" + (f" ({f['evidence'].get('split')}, best step {f['evidence']['best_step']})"
                                                           if f["kind"] == "overfitting" else "") for f in fs) or "nothing"
        out.append(f"| {n} | {what} | {ev[0][1]:.3f} → {best[1]:.3f} ({best[0]}) → {ev[-1][1]:.3f} | {found} |")
    return out


def benchmarks_table(bench: dict) -> list[str]:
    """MMLU / CMMLU accuracy base vs tuned per run, 0- and 5-shot, with 95% intervals (results/benchmarks.json,
    written by experiments/benchmarks.py)."""
    out = ["| run | benchmark | shots | base | tuned | Δ (points) [95% CI] | p |", "|---|---|---:|---:|---:|---:|---:|"]
    for run, entry in bench.items():
        for name, b in entry.items():
            for key in sorted(k for k in b if k.endswith("-shot")):
                o = b[key]["overall"]
                ci = [100 * x for x in o["delta_ci95"]]
                out.append(f"| {run} | {name} | {key[:-5]} | {100 * o['base']:.1f}% | {100 * o['tuned']:.1f}% | "
                           f"{fmt_delta(100 * o['delta'], ci, 1)} | {o['p_value']:.2f} |")
    return out


# The sets each rerun is evaluated on; every bitext-* folder of a rerun is a fix of the forgetting
# experiment (experiments/run.py "forgetting": bitext-mix10/20/30, bitext-lr1e-5, bitext-earlystop).
BITEXT_SETS = ("seen", "unseen", "general")
HUATUO_SETS = ("heldout", "general")


def _evaluated(d: Path, sets: tuple[str, ...]) -> bool:
    return all((d / "eval" / f"predictions-{w}-{s}.jsonl").is_file() for w in ("base", "tuned") for s in sets)


def fix_kept_cut(ref: Path, fix: Path) -> tuple[str, str]:
    """Domain gain kept (Δ ROUGE-L `seen` of the fix over the reference's) and degradation cut
    (1 - Δ general loss of the fix over the reference's), each with a joint 95% interval over the
    prompts both runs answered."""
    k, kci = joint_ci([set_stats(ref, "seen")["rouge-l"], set_stats(fix, "seen")["rouge-l"]], lambda x, y: y / x)
    if "loss" in set_stats(ref, "general") and "loss" in set_stats(fix, "general"):
        c, cci = joint_ci([set_stats(ref, "general")["loss"], set_stats(fix, "general")["loss"]], lambda x, y: 1 - y / x)
        cut = _pct(c, cci)
    else:
        cut = "— (no per-prompt losses)"
    return _pct(k, kci), cut


def rerun_section(res: Path) -> list[str]:
    """The runs retrained on a GPU with per-prompt losses in their predictions (res = results/rerun):
    each run's own deltas, then every fix run (each bitext-* folder) against that rerun's bitext: domain
    gain kept and degradation cut, both with intervals. Folders without predictions (a run cut off by the
    stage's timeout) are named and left out."""
    runs = res / "runs"
    fixes = sorted(p.name for p in runs.glob("bitext-*") if p.is_dir())
    order = [("bitext", BITEXT_SETS), *[(f, BITEXT_SETS) for f in fixes], ("huatuo", HUATUO_SETS)]
    done = [(run, sets) for run, sets in order if (runs / run).is_dir() and _evaluated(runs / run, sets)]
    missing = [run for run, sets in order if (runs / run).is_dir() and not _evaluated(runs / run, sets)]
    lines = ["| run | set | Δ ROUGE-L [95% CI] | Δ loss [95% CI] |", "|---|---|---:|---:|"]
    for run, sets in done:
        for name in sets:
            st = set_stats(runs / run, name)
            r = paired_summary(*st["rouge-l"])
            lo = paired_summary(*st["loss"]) if "loss" in st else None
            lines.append(f"| {run} | {name} | {fmt_delta(r['delta'], r['delta_ci95'])} | "
                         f"{fmt_delta(lo['delta'], lo['delta_ci95'], 3) if lo else '—'} |")
    names = [run for run, _ in done]
    evaluated_fixes = [f for f in fixes if f in names]
    if "bitext" in names and evaluated_fixes:
        lines += ["", "Each fix against this rerun's `bitext`, 95% intervals resampled jointly over the prompts both "
                  "runs answered:", "",
                  "| fix run | domain gain kept [95% CI] | degradation cut [95% CI] |", "|---|---:|---:|"]
        for f in evaluated_fixes:
            kept, cut = fix_kept_cut(runs / "bitext", runs / f)
            lines.append(f"| {f} | {kept} | {cut} |")
    if missing:
        lines += ["", "Not evaluated (no predictions), left out: " + ", ".join(missing) + "."]
    return lines


def check(lines: list[str], doc: Path) -> list[str]:
    """The table rows of ``lines`` that ``doc`` does not contain, verbatim."""
    have = set(doc.read_text(encoding="utf-8").splitlines())
    return [l for l in lines if l.startswith("|") and l not in have]


def plot(pts: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    for name, gain, deg in pts:
        ax.scatter(deg, gain)
        ax.annotate(name, (deg, gain), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel("general-set loss increase (forgetting) →")
    ax.set_ylabel("domain gain: Δ ROUGE-L (seen)")
    ax.set_title("Domain gain vs general-domain degradation", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "img" / "gain-vs-forgetting.png"))
    ap.add_argument("--check", metavar="DOC", help="print the table rows DOC (docs/results.md) lacks; exit 1 if any")
    a = ap.parse_args()
    res = Path(a.results)
    runs = {}
    for p in sorted(res.glob("*.json")):
        if p.name != "benchmarks.json":
            runs.update(json.loads(p.read_text()))
    for r in runs.values():
        r["_dir"] = str(res / "runs" / r["name"])
    lines = []
    if "bitext" in runs:
        lines += ["\n### Bitext (English customer support)", *writeup_table(runs["bitext"], ["seen", "unseen"])]
    if "huatuo" in runs:
        lines += ["\n### Huatuo (Chinese medical QA)", *writeup_table(runs["huatuo"], ["heldout"]), *general_row("huatuo")]
    bitext_runs = [r for n, r in runs.items() if n.startswith("bitext") and r.get("metrics_llamafactory")]
    if bitext_runs:
        t, pts = forgetting_table(bitext_runs)
        lines += ["\n### Forgetting and its fixes (Dolly open_qa as the general set)\n", *t]
        if not a.check:  # a check writes nothing
            Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
            plot(pts, Path(a.plot))
    if "e2e" in runs:
        lines += ["\n### E2E NLG\n", *e2e_table(runs["e2e"])]
    health_runs = [n for n in ("bitext", "bitext-mix10", "huatuo") if n in runs]
    if health_runs:
        lines += ["\n### Generation health\n", *health_table(health_runs)]
    if (res / "benchmarks.json").is_file():
        lines += ["\n### MMLU / CMMLU before vs after\n", *benchmarks_table(json.loads((res / "benchmarks.json").read_text()))]
    if (res / "rerun" / "runs").is_dir():
        lines += ["\n### The reruns: benchmark runs and every forgetting fix (MMLU and CMMLU subsection)\n", *rerun_section(res / "rerun")]
    diag = [n for n in runs if n.startswith("diag-")]
    if diag:
        lines += ["\n### Diagnosis runs\n", *diagnosis_table(runs, diag)]
    if a.check:
        stale = check("\n".join(lines).splitlines(), Path(a.check))
        print("\n".join(stale) or f"{a.check}: every table row is current")
        raise SystemExit(1 if stale else 0)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
