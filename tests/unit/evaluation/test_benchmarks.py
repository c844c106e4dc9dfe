"""Multiple-choice benchmarks: lm-eval's prompt text, the batched letter scorer against a hand-computed
log-likelihood on the tiny Llama, accuracy and intervals per subject, base vs tuned from one load, and
bad benchmark folders as one line, exit 2."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafit.cli import main
from lorafit.errors import ConfigError, DataError
from lorafit.evaluation.benchmarks import (accuracy_summary, benchmarks_table_md, build_prompt, choice_loglikelihoods,
                                         compare_benchmarks, encode_pair, load_benchmark, loglikelihood_reference)
from lorafit.evaluation.stats import bootstrap_weights

EN = [{"subject": "global_facts", "question": "Which is largest?\n", "choices": ["Mars", "Earth ", "Jupiter", "Moon"],
       "answer": "C"},
      {"subject": "global_facts", "question": "2 + 2 =", "choices": ["3", "4", "5", "6"], "answer": "B"},
      {"subject": "nutrition", "question": "Vitamin C is found in", "choices": ["oranges", "salt", "oil", "sugar"],
       "answer": "A"}]
ZH = [{"subject": "nutrition", "question": "维生素C主要存在于", "choices": ["橙子", "盐", "油", "糖"], "answer": "A"},
      {"subject": "chinese_history", "question": "秦朝的开国皇帝是", "choices": ["刘邦", "嬴政", "李世民", "朱元璋"],
       "answer": "B"}]


def _folder(root: Path, name: str, test: list[dict], dev: list[dict] | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test), encoding="utf-8")
    if dev is not None:
        (d / "dev.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dev), encoding="utf-8")
    return d


@pytest.fixture
def mmlu(tmp_path: Path) -> Path:
    dev = [dict(r, question=f"Dev {i} {r['question']}") for i, r in enumerate(EN * 2)]  # 4 global_facts, 2 nutrition
    return _folder(tmp_path, "mini-mmlu", EN, dev)


def test_reads_format_and_builds_lm_evals_prompts(mmlu, tmp_path):
    b = load_benchmark(mmlu, shots=(0, 2))
    assert (b.name, b.lang, len(b.test)) == ("mini-mmlu", "en", 3)
    assert [q.answer for q in b.test] == [2, 1, 0] and b.test[0].choices[1] == "Earth "
    assert [len(v) for v in b.dev.values()] == [4, 2]
    # lm-eval's mmlu template: description, question.strip(), choices verbatim, "Answer:"
    assert build_prompt(b, b.test[0], 0) == (
        "The following are multiple choice questions (with answers) about global facts.\n\n"
        "Which is largest?\nA. Mars\nB. Earth \nC. Jupiter\nD. Moon\nAnswer:")
    # k-shot: the first k dev rows of the same subject, each solved and followed by a blank line
    assert build_prompt(b, b.test[2], 1) == (
        "The following are multiple choice questions (with answers) about nutrition.\n\n"
        "Dev 2 Vitamin C is found in\nA. oranges\nB. salt\nC. oil\nD. sugar\nAnswer: A\n\n"
        "Vitamin C is found in\nA. oranges\nB. salt\nC. oil\nD. sugar\nAnswer:")
    zh = load_benchmark(_folder(tmp_path, "mini-cmmlu", ZH), shots=(0,))
    assert zh.lang == "zh"
    assert build_prompt(zh, zh.test[0], 0) == (
        "以下是关于营养学的单项选择题，请直接给出正确答案的选项。\n\n维生素C主要存在于\nA. 橙子\nB. 盐\nC. 油\nD. 糖\n答案：")


@pytest.mark.parametrize("setup, err, where", [
    (lambda d: None, ConfigError, "benchmark folder not found"),
    (lambda d: d.mkdir(), ConfigError, "no test.jsonl"),
    (lambda d: _w(d, '{"subject": "a", "question": "q", "choices": ["x", "y"], "answer": "B"}\nnot json\n'),
     DataError, "test.jsonl:2"),
    (lambda d: _w(d, '{"subject": "a", "question": "q", "choices": ["x", "y"], "answer": "C"}\n'),
     DataError, "field 'answer'"),
    (lambda d: _w(d, '{"subject": "a", "question": "q", "choices": "xy", "answer": "A"}\n'),
     DataError, "field 'choices'"),
    (lambda d: _w(d, '{"subject": "", "question": "q", "choices": ["x", "y"], "answer": "A"}\n'),
     DataError, "field 'subject'"),
    (lambda d: _w(d, ""), DataError, "no questions"),
])
def test_bad_benchmark_folder_names_file_line_field(tmp_path, setup, err, where):
    d = tmp_path / "bench"
    setup(d)
    with pytest.raises(err, match=where.replace("(", r"\(")):
        load_benchmark(d)


def _w(d: Path, text: str) -> None:
    d.mkdir()
    (d / "test.jsonl").write_text(text, encoding="utf-8")


def test_k_shot_needs_k_dev_rows(mmlu):
    with pytest.raises(DataError, match="3-shot needs 3 dev exemplars of subject 'nutrition', found 2"):
        load_benchmark(mmlu, shots=(0, 3))


def test_cli_bad_benchmark_is_one_line_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "hi", "output": "hello"}] * 4))
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: HuggingFaceTB/SmolLM2-135M-Instruct\ndata: {data}\nval_size: 2\n")
    monkeypatch.setattr("lorafit.model.check_adapter", lambda *a, **k: None)
    run_module = importlib.import_module("lorafit.evaluation.run")
    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(run_module, name, lambda *a, **k: pytest.fail("the model loaded before the benchmark was checked"))
    rc = main(["eval", str(run), "--benchmarks", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nope" in err[0] and "field 'benchmarks'" in err[0]
    rc = main(["eval", str(run), "--benchmarks", str(tmp_path / "nope"), "--shots", "0,x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "field '--shots'" in err[0]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from lorafit.model import load_model, load_tokenizer

    return load_model(tiny_model_dir, device="cpu", dtype="float32").eval(), load_tokenizer(tiny_model_dir)


@pytest.mark.parametrize("shots", [0, 2])
def test_batched_scorer_equals_hand_computed_loglikelihood(tiny, mmlu, shots):
    """One forward per batch (shared prefix cached, right padding, last position only) gives what a full
    forward + log_softmax over each prompt + " X" gives, for every letter."""
    model, tok = tiny
    b = load_benchmark(mmlu, shots=(shots,))
    prompts = [build_prompt(b, q, shots) for q in b.test]
    fast = choice_loglikelihoods(model, tok, prompts, [4] * len(prompts), groups=[q.subject for q in b.test],
                                 batch_size=2)
    ref = [[loglikelihood_reference(model, *encode_pair(tok, p, f" {x}")) for x in "ABCD"] for p in prompts]
    assert np.allclose(fast, ref, atol=1e-4)
    # the reference by hand: log_softmax of the logits after the prompt, at " A"'s id
    ids = tok(prompts[0])["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    assert fast[0][0] == pytest.approx(float(logp[tok(" A", add_special_tokens=False)["input_ids"][0]]), abs=1e-4)


def test_multi_token_continuations_fall_back_to_the_full_loglikelihood(tiny):
    """A tokenizer that splits " A" into two tokens takes the full-continuation path (lm-eval's loglikelihood)."""
    model, tok = tiny

    class Split:
        pad_token_id = tok.pad_token_id

        def __call__(self, texts):
            one = isinstance(texts, str)
            out = [tok(t)["input_ids"] + ([] if t[-2:-1] != " " else [tok("X")["input_ids"][0]])
                   for t in ([texts] if one else texts)]
            return {"input_ids": out[0] if one else out}

    got = choice_loglikelihoods(model, Split(), ["Question?\nAnswer:"], [2])
    ref = [loglikelihood_reference(model, *encode_pair(Split(), "Question?\nAnswer:", f" {x}")) for x in "AB"]
    assert len(encode_pair(Split(), "Question?\nAnswer:", " A")[1]) == 2
    assert np.allclose(got[0], ref, atol=1e-5)


def test_accuracy_per_subject_and_overall_with_intervals():
    base = [1, 0, 1, 0, 1, 1, 0, 0]
    tuned = [1, 1, 1, 0, 0, 1, 0, 1]
    subjects = ["a"] * 4 + ["b"] * 4
    s = accuracy_summary({"base": base, "tuned": tuned}, subjects)
    o = s["overall"]
    assert (o["n"], o["base"], o["tuned"], o["delta"]) == (8, 0.5, 0.625, 0.125)
    assert (s["subjects"]["a"]["base"], s["subjects"]["a"]["tuned"]) == (0.5, 0.75)
    assert (s["subjects"]["b"]["base"], s["subjects"]["b"]["tuned"]) == (0.5, 0.5)
    # the interval by hand: the same seeded resamples (evaluate/stats.py), percentiles of the resampled means
    w = bootstrap_weights(8)
    assert o["base_ci95"] == pytest.approx(list(np.percentile(w @ np.array(base, float) / 8, [2.5, 97.5])))
    d = np.array(tuned, float) - np.array(base, float)
    assert o["delta_ci95"] == pytest.approx(list(np.percentile(w @ d / 8, [2.5, 97.5])))
    assert o["delta_ci95"][0] <= o["delta"] <= o["delta_ci95"][1] and 0 < o["p_value"] <= 1
    assert accuracy_summary({"base": base, "tuned": tuned}, subjects) == s  # seeded
    table = benchmarks_table_md({"mini": {"0-shot": s}})
    assert "| mini | 0 | 8 | 50.0 [" in table and "| +12.5 [" in table


def test_base_and_tuned_from_one_load(tiny, mmlu, tmp_path, tiny_model_dir):
    """disable_adapter() gives the bare model's answers; the adapter-on pass gives the tuned ones."""
    from peft import LoraConfig, get_peft_model

    from lorafit.model import load_model

    model, tok = tiny
    b = load_benchmark(mmlu, shots=(0, 1))
    bare = compare_benchmarks(model, tok, [b], out_dir=tmp_path / "bare", progress=False)["mini-mmlu"]
    assert "tuned" not in bare["0-shot"]["overall"]  # no adapter: the base only
    peft = get_peft_model(load_model(tiny_model_dir, device="cpu", dtype="float32"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.eval()
    res = compare_benchmarks(peft, tok, [b], out_dir=tmp_path / "eval", progress=False)["mini-mmlu"]
    assert {k for k in res if k.endswith("-shot")} == {"0-shot", "1-shot"}
    for k in (0, 1):
        o = res[f"{k}-shot"]["overall"]
        assert o["base"] == bare[f"{k}-shot"]["overall"]["base"] and {"tuned", "delta", "delta_ci95", "p_value"} <= set(o)
        assert set(res[f"{k}-shot"]["subjects"]) == {"global_facts", "nutrition"}
        rows = [json.loads(x) for x in (tmp_path / "eval" / f"benchmark-mini-mmlu-{k}shot.jsonl").read_text().splitlines()]
        plain = [json.loads(x) for x in (tmp_path / "bare" / f"benchmark-mini-mmlu-{k}shot.jsonl").read_text().splitlines()]
        assert [r["answer"] for r in rows] == ["C", "B", "A"] and all(len(r["loglik_tuned"]) == 4 for r in rows)
        assert np.allclose([r["loglik_base"] for r in rows], [r["loglik_base"] for r in plain], atol=1e-3)
        assert not np.allclose([r["loglik_tuned"] for r in rows], [r["loglik_base"] for r in plain], atol=1e-3)


def _series(general: list[float] | None = None):
    from lorafit.diagnosis.records import RunSeries

    evals = {} if general is None else {"general": (np.arange(1, len(general) + 1) * 10.0, np.array(general))}
    return RunSeries(np.arange(1.0, 41), np.linspace(2, 1, 40), None, None, None, [], evals, [],
                     {"learning_rate": 1e-4, "num_epochs": 3})


def _metrics(delta: float, ci: list[float]) -> dict:
    o = {"n": 1000, "base": 0.40, "tuned": 0.40 + delta, "delta": delta, "delta_ci95": ci, "p_value": 0.001}
    return {"sets": {}, "benchmarks": {"mmlu-en": {"0-shot": {"overall": o, "subjects": {}}}}}


def test_diagnose_forgetting_uses_benchmark_drop_and_its_interval():
    from lorafit.diagnosis.generalization import detect_forgetting

    f = detect_forgetting(_series([2.0, 2.01]), _metrics(-0.061, [-0.085, -0.038]))
    assert f is not None and f.severity == "critical"
    assert "mmlu-en 0-shot accuracy down 6.1 points [3.8, 8.5]" in f.summary
    assert f.evidence["benchmarks"]["mmlu-en 0-shot"]["delta_ci95"] == [-0.085, -0.038]
    f = detect_forgetting(_series([2.0, 2.01]), _metrics(-0.03, [-0.05, -0.01]))
    assert f.severity == "warning" and "down 3.0 points" in f.summary
    # a drop whose interval reaches 0 is noise: no finding from it (the general loss barely moved)
    assert detect_forgetting(_series([2.0, 2.01]), _metrics(-0.03, [-0.06, 0.004])) is None


def test_report_section_lists_overall_and_subjects():
    from lorafit.reporting.benchmarks import benchmark_blocks
    from lorafit.reporting.render import to_html

    s = accuracy_summary({"base": [1, 0, 1, 0], "tuned": [1, 1, 1, 0]}, ["营养学", "营养学", "b", "b"])
    blocks = benchmark_blocks({"benchmarks": {"cmmlu-zh": {"path": "x", "5-shot": s}}})
    rows = blocks[-1][2]
    assert [r[2] for r in rows] == ["overall", "营养学", "b"] and rows[0][:4] == ["cmmlu-zh", "5", "overall", 4]
    assert rows[0][4].startswith("50.0 [") and rows[0][6].startswith("+25.0 [")
    assert "营养学" in to_html("r", blocks) and benchmark_blocks({"sets": {}}) == []


def test_lorafit_eval_benchmarks_end_to_end(tiny_model_dir, mmlu, tmp_path, capsys):
    """`lorafit eval RUN --benchmarks` on the tiny Llama: metrics.json gains 'benchmarks', metrics.md its table."""
    from peft import LoraConfig, get_peft_model

    from lorafit.model import load_model

    run = tmp_path / "run"
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]))
    run.mkdir()
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\ndata: [{data}]\nval_size: 2\nmax_new_tokens: 2\n")
    peft = get_peft_model(load_model(tiny_model_dir, device="cpu", dtype="float32"),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(run / "adapter")
    assert main(["eval", str(run), "--benchmarks", str(mmlu), "--shots", "0,1"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(m["benchmarks"]["mini-mmlu"]) >= {"0-shot", "1-shot"} and "val" in m["sets"]
    assert m["benchmarks"]["mini-mmlu"]["1-shot"]["overall"]["n"] == 3
    assert "| mini-mmlu | 1 | 3 |" in (run / "eval" / "metrics.md").read_text()
    assert (run / "eval" / "benchmark-mini-mmlu-1shot.jsonl").is_file()
