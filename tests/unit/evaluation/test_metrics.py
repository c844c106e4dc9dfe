"""lorafit's scores against the reference libraries called directly (LLaMA-Factory's exact recipe for
`llamafactory` mode; sacrebleu and rouge-score for `standard`), plus predictions-file errors."""
from __future__ import annotations

import json
import logging

import jieba
import numpy as np
import pytest
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge
from rouge_score import rouge_scorer

from lorafit.errors import DataError, LorafitError
from lorafit.evaluation import KEYS, detect_lang, metrics_table_md, score_file, score_predictions
from lorafit.evaluation.metrics import WhitespaceTokenizer, segment_zh

jieba.setLogLevel(logging.CRITICAL)

EN_PREDS = [
    "I'm sorry to hear that. To cancel your order, go to Order History and click Cancel.",
    "You can track the package from the Shipping page of your account.",
    "",  # an empty answer must score 0, not crash
    "Refunds take 5-7 business days.",
    "Please contact support.",
]
EN_REFS = [
    "To cancel your order, sign in, open Order History, pick the order and click Cancel Order.",
    "Track your package on the Shipping page in your account, using the tracking number.",
    "Our support team is available 24/7.",
    "Refunds usually take 5 to 7 business days to appear on your statement.",
    "Please contact our customer support team.",
]
ZH_PREDS = [
    "感冒一般多喝水，注意休息，必要时服用退烧药。",
    "高血压患者应该低盐饮食，规律服药。",
    "",
    "建议去医院做进一步检查。",
]
ZH_REFS = [
    "感冒时应多喝温水，充分休息，发烧超过38.5度可以服用退烧药。",
    "高血压病人要低盐低脂饮食，按时服用降压药，定期监测血压。",
    "糖尿病需要控制饮食。",
    "建议到正规医院进行进一步的检查和治疗。",
]


def llamafactory_reference(preds, labels):
    """LLaMA-Factory's ComputeSimilarity loop, verbatim in substance (src/llamafactory/train/sft/metric.py)."""
    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(preds, labels):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))
        bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu_score * 100, 4))
    return {k: float(np.mean(v)) for k, v in score_dict.items()}


def assert_close(got, want):
    assert set(got) == set(KEYS)
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


@pytest.mark.parametrize("preds,refs", [(EN_PREDS, EN_REFS), (ZH_PREDS, ZH_REFS)], ids=["en", "zh"])
def test_llamafactory_mode_equals_llamafactory(preds, refs):
    got = score_predictions(preds, refs, mode="llamafactory")
    assert_close(got, llamafactory_reference(preds, refs))
    assert 0 < got["rouge-1"] < 100 and 0 < got["bleu-4"] < 100


def test_standard_mode_english_equals_libraries():
    got = score_predictions(EN_PREDS, EN_REFS, mode="standard")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    per = [scorer.score(r, p) for p, r in zip(EN_PREDS, EN_REFS)]
    want = {"rouge-1": 100 * np.mean([s["rouge1"].fmeasure for s in per]),
            "rouge-2": 100 * np.mean([s["rouge2"].fmeasure for s in per]),
            "rouge-l": 100 * np.mean([s["rougeL"].fmeasure for s in per]),
            "bleu-4": sacrebleu.corpus_bleu(EN_PREDS, [EN_REFS], tokenize="13a").score}
    assert_close(got, want)
    assert score_predictions(EN_PREDS, EN_REFS, mode="standard", lang="en") == got  # detected as en


def test_standard_mode_chinese_equals_libraries():
    got = score_predictions(ZH_PREDS, ZH_REFS, mode="standard")
    seg = lambda t: " ".join(w for w in jieba.cut(t.lower()) if w.strip())  # noqa: E731
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=WhitespaceTokenizer())
    per = [scorer.score(seg(r), seg(p)) for p, r in zip(ZH_PREDS, ZH_REFS)]
    want = {"rouge-1": 100 * np.mean([s["rouge1"].fmeasure for s in per]),
            "rouge-2": 100 * np.mean([s["rouge2"].fmeasure for s in per]),
            "rouge-l": 100 * np.mean([s["rougeL"].fmeasure for s in per]),
            "bleu-4": sacrebleu.corpus_bleu(ZH_PREDS, [ZH_REFS], tokenize="zh").score}
    assert_close(got, want)
    assert got["rouge-1"] > 10  # the default rouge-score tokenizer would give 0 on Chinese
    assert segment_zh("建议去医院") == "建议 去 医院"


def test_multiple_references():
    preds = ["There is a cheap pub near the river.", "The Eagle serves Chinese food."]
    refs = [["A cheap pub by the river.", "There is a cheap pub near the river called The Mill."],
            "The Eagle is a Chinese restaurant."]
    got = score_predictions(preds, refs, mode="standard")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    per = [scorer.score_multi(r if isinstance(r, list) else [r], p) for p, r in zip(preds, refs)]
    streams = [[refs[0][0], refs[1]], [refs[0][1], None]]  # variable reference counts
    want = {"rouge-1": 100 * np.mean([s["rouge1"].fmeasure for s in per]),
            "rouge-2": 100 * np.mean([s["rouge2"].fmeasure for s in per]),
            "rouge-l": 100 * np.mean([s["rougeL"].fmeasure for s in per]),
            "bleu-4": sacrebleu.corpus_bleu(preds, streams, tokenize="13a").score}
    assert_close(got, want)
    # llamafactory mode: best reference per ROUGE metric, nltk's multi-reference BLEU.
    lf = score_predictions(preds, refs, mode="llamafactory")
    best = [llamafactory_reference([preds[0]], [r]) for r in refs[0]]
    second = llamafactory_reference([preds[1]], [refs[1]])
    for k in ("rouge-1", "rouge-2", "rouge-l"):
        assert lf[k] == pytest.approx((max(b[k] for b in best) + second[k]) / 2, abs=1e-6)
    bleu0 = round(100 * sentence_bleu([list(r) for r in refs[0]], list(preds[0]),
                                      smoothing_function=SmoothingFunction().method3), 4)
    assert lf["bleu-4"] == pytest.approx((bleu0 + second["bleu-4"]) / 2, abs=1e-6)


@pytest.mark.parametrize("mode", ["llamafactory", "standard"])
def test_empty_and_perfect_predictions(mode):
    assert score_predictions(["", ""], ["a reference", "参考答案"], mode=mode) == {k: 0.0 for k in KEYS}
    assert score_predictions([], [], mode=mode) == {k: 0.0 for k in KEYS}
    assert score_predictions(["x"], [""], mode=mode)["rouge-1"] == 0.0  # empty reference: 0, no crash
    text = "The capital of France is Paris and it is a large city."
    perfect = score_predictions([text], [text], mode=mode)
    assert all(v == pytest.approx(100.0) for v in perfect.values())


def test_long_texts_do_not_hit_the_recursion_limit():
    long_pred = " ".join(f"word{i % 50}" for i in range(1500))
    long_ref = " ".join(f"word{i % 47}" for i in range(1500))
    assert score_predictions([long_pred], [long_ref])["rouge-l"] > 0


def test_detect_lang_and_bad_arguments():
    assert detect_lang(ZH_REFS) == "zh" and detect_lang(EN_REFS) == "en"
    assert detect_lang(["新冠病毒 PCR 检测需要使用鼻拭子"]) == "zh"
    assert detect_lang([""]) == "en"
    mixed = EN_REFS + ZH_REFS[:2]  # a bilingual set: Chinese tokenization keeps both halves countable
    assert detect_lang(mixed) == "zh"
    assert detect_lang(["Say 谢谢 (thank you) when someone helps you; it is polite in every situation."]) == "en"
    with pytest.raises(DataError, match="counts must match"):
        score_predictions(["a", "b"], ["a"])
    with pytest.raises(LorafitError, match="mode"):
        score_predictions(["a"], ["a"], mode="bleurt")
    with pytest.raises(LorafitError, match="language"):
        score_predictions(["a"], ["a"], lang="fr")


def _write(tmp_path, lines, name="generated_predictions.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def test_score_file_reads_llamafactory_format(tmp_path):
    rows = [json.dumps({"prompt": "<|im_start|>user\nq<|im_end|>\n", "predict": p, "label": r}, ensure_ascii=False)
            for p, r in zip(ZH_PREDS, ZH_REFS)]
    path = _write(tmp_path, rows)
    assert_close(score_file(path), llamafactory_reference(ZH_PREDS, ZH_REFS))
    assert_close(score_file(path, mode="standard", lang="zh"), score_predictions(ZH_PREDS, ZH_REFS, "standard", "zh"))
    multi = _write(tmp_path, [json.dumps({"predict": "a pub", "label": ["a pub", "the pub"]})], "multi.jsonl")
    assert score_file(multi, mode="standard")["rouge-1"] == pytest.approx(100.0)


@pytest.mark.parametrize("lines,line,field,match", [
    (['{"predict": "a", "label": "a"}', '{"predict": "a", "label": '], 2, None, "invalid JSON"),
    (['{"predict": "a", "label": "a"}', "", '{"predict": "b"}'], 3, "label", "missing field"),
    (['{"label": "a"}'], 1, "predict", "missing field"),
    (['{"predict": null, "label": "a"}'], 1, "predict", "expected a string, got null"),
    (['{"predict": "a", "label": []}'], 1, "label", "empty list"),
    (['{"predict": "a", "label": ["a", 3]}'], 1, "label", "strings"),
    (['["a", "b"]'], 1, None, "JSON object"),
    ([], None, None, "no predictions"),
])
def test_bad_predictions_files(tmp_path, lines, line, field, match):
    path = _write(tmp_path, lines)
    with pytest.raises(DataError, match=match) as e:
        score_file(path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), line, field)


def test_unreadable_predictions_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"predict": "a", "label": "a"}\n{"predict": "\xff", "label": "a"}\n')
    with pytest.raises(DataError, match="UTF-8") as e:
        score_file(bad)
    assert e.value.line == 2
    with pytest.raises(DataError, match="not found"):
        score_file(tmp_path / "missing.jsonl")


def test_metrics_table_md():
    row = {"rouge-1": 10.0, "rouge-2": 5.0, "rouge-l": 8.0, "bleu-4": 3.0}
    up = {k: v + 2 for k, v in row.items()}
    metrics = {"mode": "llamafactory", "sets": {
        "val": {"lang": "en", "n": 3, "before": row, "after": up, "delta": {k: 2.0 for k in row},
                "loss_before": 2.5, "loss_after": 1.5},
        "general": {"lang": "en", "n": 2, "before": up, "after": row, "delta": {k: -2.0 for k in row},
                    "loss_before": 2.0, "loss_after": None}}}
    md = metrics_table_md(metrics)
    assert "| ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 |" in md
    assert "| val | en | 3 | before | 10.00 | 5.00 | 8.00 | 3.00 | 2.500 |" in md
    assert "| **delta** | +2.00 | +2.00 | +2.00 | +2.00 | -1.000 |" in md
    assert "| general | general (forgetting) | -2.00 | -2.00 | -2.00 | -2.00 | – |" in md
    assert md.index("| val | domain") < md.index("| general | general (forgetting)")
