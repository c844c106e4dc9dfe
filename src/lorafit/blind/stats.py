"""Results of a blind test: is B (the tuned model, from a run) better than A, by how much, and do
the raters agree?

The unit of analysis is the item (prompt): we want to generalise to new prompts, and ratings of
one item by several raters are not independent. So each item's score is the mean over the raters
who rated it; means and their 95% intervals come from a percentile bootstrap over items, the
paired test is Wilcoxon signed-rank on per-item means (B - A, zero differences dropped), and
its p-values are Holm-adjusted over all tests reported (four dimensions, their mean, preference).
Win/tie/loss rates count single ratings (B against A). Agreement is Krippendorff's alpha
(ordinal) over raters, with units (item, model) for scores and items for the preference.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import IO, Any

import krippendorff
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import wilcoxon

from . import store

ROWS = store.DIMENSIONS + ("overall",)
RESAMPLES = 2000


def _num(x: Any) -> float | None:
    """JSON-safe float: NaN and inf become None."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _scores(ratings: list[dict], model: str, row: str) -> np.ndarray:
    if row == "overall":
        return np.array([np.mean([r[f"{model}_{d}"] for d in store.DIMENSIONS]) for r in ratings], float)
    return np.array([r[f"{model}_{row}"] for r in ratings], float)


def _per_item(values: np.ndarray, item_of: np.ndarray, n_items: int) -> np.ndarray:
    return np.bincount(item_of, values, n_items) / np.bincount(item_of, minlength=n_items)


def _interval(x: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
    boot = x[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": _num(x.mean()), "ci95": [_num(lo), _num(hi)]}


def _wilcoxon(diff: np.ndarray) -> dict[str, Any]:
    nonzero = int(np.count_nonzero(diff))
    if nonzero == 0:  # every item tied: no evidence of a difference, scipy would return NaN
        return {"statistic": None, "p": 1.0 if len(diff) else None, "n": nonzero}
    res = wilcoxon(diff, zero_method="wilcox")
    return {"statistic": _num(res.statistic), "p": _num(res.pvalue), "n": nonzero}


def _alpha(matrix: np.ndarray, domain: list[int]) -> float | None:
    """None when no unit was rated by two raters, or the raters used a single value."""
    if matrix.shape[0] < 2 or not np.any((~np.isnan(matrix)).sum(axis=0) >= 2):
        return None
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # no variation at all -> NaN -> None
            return _num(krippendorff.alpha(matrix, level_of_measurement="ordinal", value_domain=domain))
    except (ValueError, ZeroDivisionError):
        return None


def _holm(ps: list[float | None]) -> list[float | None]:
    order = sorted((p, k) for k, p in enumerate(ps) if p is not None)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, (p, k) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[k] = running
    return out


def results(db_path: str | Path, *, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Everything the report shows, as a JSON-safe dict (see the module docstring for methods)."""
    study = store.load_study(db_path)
    ratings = store.all_ratings(db_path)
    items = sorted({r["item"] for r in ratings})
    raters = sorted(study.raters.values())
    item_pos = {item: k for k, item in enumerate(items)}
    rater_pos = {rater: k for k, rater in enumerate(raters)}
    item_of = np.array([item_pos[r["item"]] for r in ratings], int)
    rater_of = np.array([rater_pos[r["rater"]] for r in ratings], int)
    n = len(items)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n)) if n else None
    out: dict[str, Any] = {
        "study": {"items": len(study.items), "raters": len(raters), "ratings": len(ratings),
                  "expected": sum(len(v) for v in study.layout.values()), "items_rated": n},
        "models": {m: {"name": study.meta[f"name_{m}"], "source": study.meta[f"source_{m}"]} for m in "ab"},
        "dimensions": {}, "preference": {},
        "method": {"unit": "item (mean over its raters)", "interval": "percentile bootstrap over items",
                   "resamples": resamples, "seed": seed, "test": "Wilcoxon signed-rank on per-item means, "
                   "B - A, zeros dropped; Holm-adjusted", "agreement": "Krippendorff's alpha, ordinal"},
    }
    tests: list[dict] = []
    for row in ROWS:
        a, b = _scores(ratings, "a", row), _scores(ratings, "b", row)
        sign = np.sign(b - a)
        entry: dict[str, Any] = {
            "n": len(ratings),
            "win": _num(np.mean(sign > 0)) if len(sign) else None,
            "tie": _num(np.mean(sign == 0)) if len(sign) else None,
            "loss": _num(np.mean(sign < 0)) if len(sign) else None,
        }
        if n:
            ia, ib = _per_item(a, item_of, n), _per_item(b, item_of, n)
            entry.update(a=_interval(ia, idx), b=_interval(ib, idx), diff=_interval(ib - ia, idx),
                         wilcoxon=_wilcoxon(ib - ia))
            tests.append(entry["wilcoxon"])
        else:
            entry.update(a=None, b=None, diff=None, wilcoxon=None)
        matrix = np.full((len(raters), 2 * n), np.nan)
        matrix[rater_of, 2 * item_of] = a
        matrix[rater_of, 2 * item_of + 1] = b
        entry["alpha"] = _alpha(matrix, [1, 2, 3, 4, 5]) if row != "overall" else None
        out["dimensions"][row] = entry

    pref = np.array([{"a": -1.0, "tie": 0.0, "b": 1.0}[r["preference"]] for r in ratings])
    counts = {k: int(sum(r["preference"] == k for r in ratings)) for k in ("b", "tie", "a")}
    p_entry: dict[str, Any] = {"n": len(ratings), "counts": {"win": counts["b"], "tie": counts["tie"],
                                                              "loss": counts["a"]}}
    for key, model in (("win", "b"), ("tie", "tie"), ("loss", "a")):
        p_entry[key] = _num(counts[model] / len(ratings)) if ratings else None
    p_entry["wilcoxon"] = _wilcoxon(_per_item(pref, item_of, n)) if n else None
    if n:
        tests.append(p_entry["wilcoxon"])
    matrix = np.full((len(raters), n), np.nan)
    matrix[rater_of, item_of] = pref + 2  # a=1 < tie=2 < b=3
    p_entry["alpha"] = _alpha(matrix, [1, 2, 3])
    out["preference"] = p_entry
    for t, p in zip(tests, _holm([t["p"] for t in tests])):
        t["p_holm"] = p
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _p(w: dict | None) -> str:
    if not w or w.get("p") is None:
        return "–"
    return f"{w['p']:.3g} ({w['p_holm']:.3g})" if w.get("p_holm") is not None else f"{w['p']:.3g}"


def _ci(e: dict | None) -> str:
    return "–" if not e else f"{_fmt(e['mean'])} [{_fmt(e['ci95'][0])}, {_fmt(e['ci95'][1])}]"


def results_markdown(res: dict[str, Any]) -> str:
    """A Markdown section for the lorafit report (or the terminal)."""
    s, a, b = res["study"], res["models"]["a"]["name"], res["models"]["b"]["name"]
    lines = ["## Human blind test", "",
             f"{s['items']} items, {s['raters']} raters, {s['ratings']} of {s['expected']} ratings"
             f" ({s['items_rated']} items rated at least once). "
             f"A = **{a}** (`{res['models']['a']['source']}`), B = **{b}** (`{res['models']['b']['source']}`).", ""]
    if not s["ratings"]:
        return "\n".join(lines + ["No ratings yet.", ""])
    lines += [f"| dimension | {a} mean [95% CI] | {b} mean [95% CI] | {b} − {a} [95% CI] "
              f"| {b} win / tie / loss | Wilcoxon p (Holm) | α (ordinal) |",
              "|---|---|---|---|---|---|---|"]
    for row, e in res["dimensions"].items():
        lines.append(f"| {row} | {_ci(e['a'])} | {_ci(e['b'])} | {_ci(e['diff'])} | "
                     f"{_pct(e['win'])} / {_pct(e['tie'])} / {_pct(e['loss'])} | {_p(e['wilcoxon'])} | "
                     f"{_fmt(e['alpha'])} |")
    p = res["preference"]
    lines += ["", f"Overall preference, {b} against {a}: win {_pct(p['win'])}, tie {_pct(p['tie'])}, "
              f"loss {_pct(p['loss'])} (n = {p['n']}); Wilcoxon p = {_p(p['wilcoxon'])}; "
              f"α = {_fmt(p['alpha'])}.", "",
              "Scores 1–5; 'overall' is the mean of the four. Means are over items of each item's mean "
              f"across raters; 95% percentile bootstrap over items ({res['method']['resamples']} resamples); "
              "Wilcoxon signed-rank on per-item means (zeros dropped), Holm-adjusted in brackets; "
              "Krippendorff's alpha (ordinal) across raters; win/tie/loss count single ratings.", ""]
    return "\n".join(lines)


def results_plot(res: dict[str, Any], path: str | Path | IO[bytes]) -> None:
    """PNG: means with 95% intervals per dimension, and win/tie/loss bars. No pyplot, no GUI."""
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    # Model names are file names: a '$' would start matplotlib's mathtext ("a$x$.jsonl" crashes the draw).
    names = [str(res["models"][m]["name"]).replace("$", r"\$") for m in "ab"]
    rows = [r for r, e in res["dimensions"].items() if e["a"] is not None]
    x = np.arange(len(rows))
    for k, (m, color) in enumerate((("a", "#9aa4b1"), ("b", "#0b5fff"))):
        means = [res["dimensions"][r][m]["mean"] for r in rows]
        lo = [res["dimensions"][r][m]["mean"] - res["dimensions"][r][m]["ci95"][0] for r in rows]
        hi = [res["dimensions"][r][m]["ci95"][1] - res["dimensions"][r][m]["mean"] for r in rows]
        ax1.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=[lo, hi], capsize=3, color=color, label=names[k])
    ax1.set_xticks(x, rows)
    ax1.set_ylim(0, 5.4)
    ax1.set_ylabel("mean score (1–5), 95% CI")
    ax1.legend(loc="lower right", fontsize=8)
    labels = rows + ["preference"]
    entries = [res["dimensions"][r] for r in rows] + [res["preference"]]
    y = np.arange(len(labels))[::-1]
    left = np.zeros(len(labels))
    for key, color in (("win", "#1a7f37"), ("tie", "#c9ced6"), ("loss", "#b42318")):
        vals = np.array([e[key] or 0.0 for e in entries])
        ax2.barh(y, vals, left=left, color=color, label=key)
        left += vals
    ax2.set_yticks(y, labels)
    ax2.set_xlim(0, 1)
    ax2.set_xlabel(f"{names[1]} against {names[0]}: share of ratings")
    ax2.legend(loc="lower right", fontsize=8, ncols=3)
    s = res["study"]
    fig.suptitle(f"Human blind test: {s['ratings']} ratings, {s['items_rated']} items, {s['raters']} raters",
                 fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as e:  # a folder that does not exist, a read-only mount, a full disk: one line
        from ..errors import LorafitError

        raise LorafitError(f"cannot write the plot ({e.strerror or e})", file=str(path), field="--plot") from None
