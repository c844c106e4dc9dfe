"""Blind-test statistics checked against direct computations on known ratings."""
from __future__ import annotations

import json
from pathlib import Path

import krippendorff
import numpy as np
import pytest
from scipy.stats import wilcoxon

from lorafit.blind import create_study, results, results_markdown, results_plot
from lorafit.blind import store
from lorafit.blind.stats import _holm


def make_study(tmp_path: Path, n_items: int, n_raters: int) -> store.Study:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for m in "ab":
        (tmp_path / f"{m}.jsonl").write_text("".join(
            json.dumps({"prompt": f"p{i}", "predict": f"{m}{i}", "label": ""}) + "\n" for i in range(n_items)))
    info = create_study(tmp_path / "a.jsonl", tmp_path / "b.jsonl", n_raters, tmp_path / "s.db")
    return store.load_study(info.db)


def put(study: store.Study, rater: int, item: int, a: list[int], b: list[int], pref: str) -> None:
    """Store a rating given in model space (a, b scores per dimension; pref a|b|tie)."""
    rid = next(r for r, idx in study.raters.items() if idx == rater)
    iid = next(i for i, it in study.items.items() if it.pos == item + 1)
    row = {**{f"a_{d}": v for d, v in zip(store.DIMENSIONS, a)},
           **{f"b_{d}": v for d, v in zip(store.DIMENSIONS, b)}, "preference": pref}
    conn = store.connect(study.path)
    store.upsert_rating(conn, rid, iid, row, "")
    conn.close()


@pytest.fixture
def rated(tmp_path):
    """8 items x 3 raters with B better on accuracy and A on fluency; rater 3 skips item 7."""
    study = make_study(tmp_path, 8, 3)
    rng = np.random.default_rng(1)
    table = {}
    for r in (1, 2, 3):
        for i in range(8):
            if (r, i) == (3, 7):
                continue
            a = [int(x) for x in rng.integers(1, 4, 4)]
            b = [min(5, a[0] + 1 + i % 2), a[1], a[2], max(1, a[3] - 1)]
            pref = ["b", "b", "tie", "a"][(r + i) % 4]
            put(study, r, i, a, b, pref)
            table[(r, i)] = (a, b, pref)
    return study, table


def test_means_intervals_and_rates_match_direct_computation(rated):
    study, table = rated
    res = results(study.path)
    assert res["study"] == {"items": 8, "raters": 3, "ratings": 23, "expected": 24, "items_rated": 8}
    for k, dim in enumerate(store.DIMENSIONS):
        item_a = [np.mean([v[0][k] for (r, i), v in table.items() if i == it]) for it in range(8)]
        item_b = [np.mean([v[1][k] for (r, i), v in table.items() if i == it]) for it in range(8)]
        e = res["dimensions"][dim]
        assert e["a"]["mean"] == pytest.approx(np.mean(item_a))
        assert e["diff"]["mean"] == pytest.approx(np.mean(item_b) - np.mean(item_a))
        for part in ("a", "b", "diff"):
            lo, hi = e[part]["ci95"]
            assert lo <= e[part]["mean"] <= hi
        signs = np.sign([v[1][k] - v[0][k] for v in table.values()])
        assert (e["win"], e["tie"], e["loss"]) == pytest.approx(
            (np.mean(signs > 0), np.mean(signs == 0), np.mean(signs < 0)))
        diff = np.array(item_b) - np.array(item_a)
        if np.any(diff):
            assert e["wilcoxon"]["p"] == pytest.approx(wilcoxon(diff).pvalue)
        else:
            assert e["wilcoxon"]["p"] == 1.0
    assert res["dimensions"]["accuracy"]["win"] == 1.0 and res["dimensions"]["fluency"]["diff"]["mean"] < 0
    prefs = [v[2] for v in table.values()]
    assert res["preference"]["counts"] == {"win": prefs.count("b"), "tie": prefs.count("tie"),
                                           "loss": prefs.count("a")}


def test_agreement_is_krippendorffs_ordinal_alpha(rated):
    study, table = rated
    res = results(study.path)
    m = np.full((3, 16), np.nan)
    for (r, i), (a, b, _) in table.items():
        m[r - 1, 2 * i], m[r - 1, 2 * i + 1] = a[1], b[1]
    expected = krippendorff.alpha(m, level_of_measurement="ordinal", value_domain=[1, 2, 3, 4, 5])
    assert res["dimensions"]["completeness"]["alpha"] == pytest.approx(expected)


def test_perfect_agreement_single_rater_and_all_ties(tmp_path):
    study = make_study(tmp_path, 5, 2)
    for r in (1, 2):
        for i in range(5):
            put(study, r, i, [1 + i % 5, 3, 3, 3], [5 - i % 5, 3, 3, 3], "b" if i < 2 else "a")
    res = results(study.path)
    assert res["dimensions"]["accuracy"]["alpha"] == pytest.approx(1.0)
    assert res["preference"]["alpha"] == pytest.approx(1.0)
    logic = res["dimensions"]["logic"]
    assert logic["wilcoxon"]["p"] == 1.0 and logic["tie"] == 1.0 and logic["diff"]["ci95"] == [0.0, 0.0]
    one = results(make_study(tmp_path / "one", 3, 1).path)
    assert one["dimensions"]["accuracy"]["alpha"] is None and one["preference"]["win"] is None


def test_results_are_strict_json_and_render_without_ratings(tmp_path, rated):
    study, _ = rated
    json.dumps(results(study.path), allow_nan=False)
    empty = results(make_study(tmp_path / "empty", 3, 2).path)
    json.dumps(empty, allow_nan=False)
    assert "No ratings yet" in results_markdown(empty)
    results_plot(empty, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"


def test_markdown_and_plot(tmp_path, rated):
    study, _ = rated
    res = results(study.path)
    md = results_markdown(res)
    assert md.count("\n| ") == 6 and "| accuracy |" in md and "b.jsonl win / tie / loss" in md
    results_plot(res, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_results_are_deterministic_and_holm_is_right(rated):
    study, _ = rated
    assert results(study.path) == results(study.path)
    assert _holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    assert _holm([0.5, 0.9]) == [1.0, 1.0]
