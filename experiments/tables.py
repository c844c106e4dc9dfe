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
    head = ["| run | Δ ROUGE-L seen | Δ ROUGE-L unseen | Δ ROUGE-L general | Δ ROUGE-1 general | general loss before → after |",
            "|---|---:|---:|---:|---:|---|"]
    pts = []
    for r in runs:
        s = r["metrics_llamafactory"]["sets"]
        g = s["general"]
        head.append(f"| {r['name']} | {s['seen']['delta']['rouge-l']:+.2f} | {s['unseen']['delta']['rouge-l']:+.2f} | "
                    f"{g['delta']['rouge-l']:+.2f} | {g['delta']['rouge-1']:+.2f} | {g['loss_before']:.3f} → {g['loss_after']:.3f} |")
        pts.append((r["name"], s["seen"]["delta"]["rouge-l"], g["loss_after"] - g["loss_before"]))
    return head, pts


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
    lines = []
    if "bitext" in runs:
        lines += writeup_table(runs["bitext"], ["seen", "unseen"])
    bitext_runs = [r for n, r in runs.items() if n.startswith("bitext") and r.get("metrics_llamafactory")]
    if bitext_runs:
        t, pts = forgetting_table(bitext_runs)
        lines += ["\n**Forgetting and its fixes** (Dolly open_qa as the general set)\n", *t]
        Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(pts, Path(a.plot))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
