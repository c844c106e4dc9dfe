"""metrics.json's new fields (intervals, p-values, health, flips) from `compare`, and the report's
sections that show them, with Chinese and English text intact in both HTML and Markdown."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lorafit.evaluation.run import EvalSet, Measured, compare
from lorafit.evaluation.table import metrics_table_md
from lorafit.reporting import write_report

ROOT = Path(__file__).resolve().parents[3]
QUESTIONS = ["How do I return a bike?", "我想退货，怎么办？", "How do I track my order?", "请问如何预约维修？",
             "Can I cancel?", "怎样取消订单？"]
REFS = ["You can return any bike within 45 days.", "购买后45天内可以退货。", "Your tracking link is in the email.",
        "请在网站预约维修。", "Orders can be cancelled until they ship.", "订单发货前可以免费取消。"]
BEFORE = ["I am not sure.", "我不知道。", "Your tracking link is in the email.", "请在网站预约维修。", "No.", "不行。"]
AFTER = ["You can return any bike within 45 days.", "购买后45天内可以退货。", "Call us.", "请在网站预约维修。",
         "Orders can be cancelled until they ship. Orders can be cancelled until they ship. Orders can be cancelled.",
         "订单发货前可以免费取消。"]


def _entry(flips=2):
    s = EvalSet("support", QUESTIONS, REFS, [], list(range(6)), QUESTIONS, "zh")
    b = Measured(BEFORE, [False] * 6, [12.0] * 6, [6] * 6)
    a = Measured(AFTER, [False] * 4 + [True, False], [6.0, 5.0, 14.0, 6.0, 5.0, 4.0], [6] * 6)
    return compare(s, b, a, "llamafactory", flips=flips)


def test_compare_writes_intervals_health_and_flips():
    e = _entry()
    assert set(e["delta_ci95"]) == set(e["delta"]) == set(e["p_value"])
    lo, hi = e["delta_ci95"]["rouge-l"]
    assert lo <= e["delta"]["rouge-l"] <= hi and 0 < e["p_value"]["rouge-l"] <= 1
    assert e["loss_delta"] == pytest.approx(40 / 36 - 2.0) and len(e["loss_delta_ci95"]) == 2
    assert e["health"]["after"]["no_eos"] == pytest.approx(1 / 6) and e["health"]["before"]["no_eos"] == 0.0
    assert e["health"]["after"]["repetition"] == 0.0   # a repeated sentence x2.x is no loop of 3
    f = e["flips"]
    assert [r["prompt"] for r in f["improved"]] == ["How do I return a bike?", "我想退货，怎么办？"]  # tie: order kept
    assert [r["prompt"] for r in f["regressed"]] == ["How do I track my order?"]
    assert f["regressed"][0]["before"] == BEFORE[2] and f["regressed"][0]["reference"] == REFS[2]
    md = metrics_table_md({"mode": "llamafactory", "stats": {"interval": "x"}, "sets": {"support": e}})
    assert f"{e['delta']['rouge-l']:+.2f} [{lo:+.2f}, {hi:+.2f}]" in md and "## Generation health" in md


def test_report_shows_intervals_flips_and_health_in_both_languages(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ROOT / "results" / "runs" / "bitext-support-cpu", run,
                    ignore=shutil.ignore_patterns("report.*", "eval", "*.png"))
    (run / "eval").mkdir()
    e = _entry()
    (run / "eval" / "metrics.json").write_text(json.dumps({"mode": "llamafactory", "stats": {
        "interval": "paired percentile bootstrap over prompts (95%)", "resamples": 2000, "seed": 0,
        "test": "paired permutation test"}, "sets": {"support": e}}, ensure_ascii=False), encoding="utf-8")
    html_path, md_path = write_report(run)
    html, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    lo, hi = e["delta_ci95"]["rouge-l"]
    cell = f"{e['delta']['rouge-l']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    for text in (html, md):
        assert cell in text and "Per-prompt flips" in text and "Generation health" in text
        assert "我想退货，怎么办？" in text and "购买后45天内可以退货。" in text and "How do I track my order?" in text
