"""Generation health on a crafted predictions file with known problems, through `lorafit score --json`,
and the diagnose finding it turns into when tuning made a share worse."""
from __future__ import annotations

import json

import pytest

from lorafit.cli import main
from lorafit.diagnosis import diagnose_records
from lorafit.diagnosis.health import detect_generation_health
from lorafit.evaluation.health import has_leak, has_loop, health

ROWS = [  # (prompt, answer, reference): problems marked
    ("How do I return a bike?", "Open a return at lumen.example/returns within 45 days.",
     "You can return it within 45 days at lumen.example/returns."),                                   # healthy
    ("How do I track my order?", "", "The tracking link is in the shipping email."),                       # empty
    ("Can I cancel?", "Yes you can cancel. Yes you can cancel. Yes you can cancel. Yes you can cancel.",
     "Orders can be cancelled until they ship."),                                                        # repetition
    ("Where is my refund?", "It is on its way.\nuser\nThanks!", "Refunds take 5 business days."),        # template leak
    ("Can I change the address?", "Sure <|im_end|>", "Until the order ships, yes."),                       # template leak
    ("我想退货，怎么办？", "You can return the bike within 45 days.", "购买后45天内可以退货。"),               # language
    ("请问如何预约维修？", "请在网站预约维修。", "请在 lumen.example/service 预约维修。"),                    # healthy (zh)
    ("Book a repair?", "您可以在网站上预约维修服务。", "Book a repair at lumen.example/service."),          # language
]


def test_score_json_reports_health_of_a_crafted_file(tmp_path, capsys):
    path = tmp_path / "pred.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "predict": a, "label": r}, ensure_ascii=False) + "\n"
                            for p, a, r in ROWS), encoding="utf-8")
    assert main(["score", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    h = out["health"]
    assert set(out) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "health"}
    assert h["n"] == 8 and h["no_eos"] is None   # a predictions file cannot say whether EOS came
    assert h["empty"] == 1 / 8 and h["repetition"] == 1 / 8 and h["template_leak"] == 2 / 8
    assert h["language_mismatch"] == 2 / 8
    assert 0 < h["length_ratio"] < 3


def test_loop_leak_and_length_definitions():
    assert has_loop("请联系客服请联系客服请联系客服")        # 5-character unit x 3 = 15 tokens
    assert not has_loop("I can help. I can help. I can help.")  # 3 x 3 = 9 tokens: below the threshold
    assert not has_loop("1. Open the app. 2. Open the menu. 3. Open the settings.")
    assert has_leak("### Assistant: hi") and has_leak("ok\nassistant\nmore") and not has_leak("The user can log in.")
    h = health(["q1", "q2"], ["one two three four", "one two"], ["one two", ["a b c d", "a b"]], no_eos=[True, False])
    assert h["no_eos"] == 0.5 and h["length_ratio"] == pytest.approx((2.0 + 2 / 3) / 2)
    assert h["examples"]["no_eos"] == [{"prompt": "q1", "answer": "one two three four"}]


def _metrics(before: dict, after: dict) -> dict:
    base = {"no_eos": 0.0, "repetition": 0.0, "empty": 0.0, "template_leak": 0.0, "language_mismatch": 0.0,
            "length_ratio": 1.0, "n": 100, "examples": {}}
    return {"sets": {"seen": {"health": {"before": {**base, **before}, "after": {**base, **after}}}}}


def test_worse_health_after_tuning_is_a_finding_with_examples():
    ex = [{"prompt": "Can I cancel?", "answer": "Yes. Yes. Yes."}]
    found = detect_generation_health(_metrics({"repetition": 0.02}, {"repetition": 0.40, "examples": {"repetition": ex}}))
    assert len(found) == 1
    f = found[0]
    assert f.kind == "generation_health" and f.severity == "critical" and "40% of answers on set 'seen'" in f.summary
    assert f.evidence["problem"] == "repetition" and f.evidence["examples"] == ex and "EOS" in f.fix
    # the base's own habit, or a change within noise, is not the adapter's fault
    assert detect_generation_health(_metrics({"no_eos": 0.5}, {"no_eos": 0.5})) == []
    assert detect_generation_health(_metrics({}, {"empty": 0.03})) == []
    warn = detect_generation_health(_metrics({}, {"template_leak": 0.1}))[0]
    assert warn.severity == "warning" and "template" in warn.fix
    assert detect_generation_health(_metrics({"length_ratio": 1.1}, {"length_ratio": 3.0}))[0].evidence["problem"] == "length_ratio"
    # registered in diagnose: a run with only metrics still gets it
    assert any(f.kind == "generation_health" for f in diagnose_records([], _metrics({}, {"no_eos": 0.3})))


def test_answers_cut_by_the_budget_where_references_are_longer_are_not_a_finding():
    """Bitext's case (results/rerun/runs/bitext): 67% of references are longer than max_new_tokens, 65% of
    tuned answers stop there (35% before): Bitext-length answers cut by the budget, not a model that does
    not stop. The same rise over short references is a finding, and so is stopping far more often than the
    long references explain."""
    h = health(["q1", "q2", "q3", "q4"], ["a", "b", "c", "d"], ["r"] * 4, no_eos=[True, True, False, False],
               fits=[False, True, True, True])
    assert h["long_references"] == 0.25
    assert health(["q"], ["a"], ["r"], no_eos=[True])["long_references"] is None   # unknown without fits
    cut = _metrics({"no_eos": 0.35}, {"no_eos": 0.65, "long_references": 0.67})
    assert detect_generation_health(cut) == []
    short = _metrics({"no_eos": 0.35}, {"no_eos": 0.65, "long_references": 0.05})
    assert [f.evidence["problem"] for f in detect_generation_health(short)] == ["no_eos"]
    stuck = detect_generation_health(_metrics({"no_eos": 0.35}, {"no_eos": 0.98, "long_references": 0.67}))[0]
    assert stuck.severity == "critical" and "67% of its references are longer than max_new_tokens" in stuck.summary
    assert stuck.evidence["sets"][0]["before"] == 0.35
