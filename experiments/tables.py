"""Build the tables and the gain-vs-forgetting plot of docs/results.md from results/*.json.

    python experiments/tables.py [--results results] > docs/results-tables.md

Every number printed comes from the JSON the runs wrote; nothing is typed in by hand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _row(label: str, m: dict) -> str:
    return f"| {label} | " + " | ".join(f"{m[k]:.2f}" for k in KEYS) + " |"


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
    return out


def forgetting_table(runs: list[dict]) -> tuple[list[str], list[tuple[str, float, float]]]:
    """Domain gain against general-set degradation, each fix against the unmitigated `bitext` run."""
    head = ["| run | Δ ROUGE-L seen | Δ ROUGE-L unseen | general loss before → after (Δ) | Δ ROUGE-L general | "
            "degradation cut | domain gain kept |", "|---|---:|---:|---|---:|---:|---:|"]
    ref = next(r for r in runs if r["name"] == "bitext")["metrics_llamafactory"]["sets"]
    ref_gain, ref_deg = ref["seen"]["delta"]["rouge-l"], ref["general"]["loss_after"] - ref["general"]["loss_before"]
    pts = []
    for r in runs:
        s = r["metrics_llamafactory"]["sets"]
        g = s["general"]
        deg = g["loss_after"] - g["loss_before"]
        gain = s["seen"]["delta"]["rouge-l"]
        cut = "—" if r["name"] == "bitext" else f"{100 * (1 - deg / ref_deg):.0f}%"
        kept = "—" if r["name"] == "bitext" else f"{100 * gain / ref_gain:.0f}%"
        head.append(f"| {r['name']} | {gain:+.2f} | {s['unseen']['delta']['rouge-l']:+.2f} | "
                    f"{g['loss_before']:.3f} → {g['loss_after']:.3f} ({deg:+.3f}) | {g['delta']['rouge-l']:+.2f} | {cut} | {kept} |")
        pts.append((r["name"], gain, deg))
    return head, pts


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
            "| GPT-2 M + LoRA (LoRA paper, Table 3) | 70.4 | 71.8 | | |",
            f"\n{n} meaning representations scored."]


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
    a = ap.parse_args()
    res = Path(a.results)
    runs = {}
    for p in sorted(res.glob("*.json")):
        runs.update(json.loads(p.read_text()))
    for r in runs.values():
        r["_dir"] = str(res / "runs" / r["name"])
    lines = []
    if "bitext" in runs:
        lines += ["\n### Bitext (English customer support)", *writeup_table(runs["bitext"], ["seen", "unseen"])]
    if "huatuo" in runs:
        lines += ["\n### Huatuo (Chinese medical QA)", *writeup_table(runs["huatuo"], ["heldout"])]
    bitext_runs = [r for n, r in runs.items() if n.startswith("bitext") and r.get("metrics_llamafactory")]
    if bitext_runs:
        t, pts = forgetting_table(bitext_runs)
        lines += ["\n### Forgetting and its fixes (Dolly open_qa as the general set)\n", *t]
        Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(pts, Path(a.plot))
    if "e2e" in runs:
        lines += ["\n### E2E NLG\n", *e2e_table(runs["e2e"])]
    diag = [n for n in runs if n.startswith("diag-")]
    if diag:
        lines += ["\n### Diagnosis runs\n", *diagnosis_table(runs, diag)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
