"""lorafit.reporting: loss.png and report.html/report.md from fake run folders, full and partial."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from lorafit.config import load_config, save_config
from lorafit.diagnosis.synthetic import generate
from lorafit.reporting import plot_loss, study_tables, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = {"mode": "llamafactory", "sets": {
    "test": {"lang": "en", "n": 40, "before": {"rouge-1": 20.1, "rouge-2": 5.2, "rouge-l": 15.0, "bleu-4": 8.0},
             "after": {"rouge-1": 35.5, "rouge-2": 14.0, "rouge-l": 30.2, "bleu-4": 17.9},
             "delta": {"rouge-1": 15.4, "rouge-2": 8.8, "rouge-l": 15.2, "bleu-4": 9.9},
             "loss_before": 2.3, "loss_after": 1.2},
    "general": {"lang": "zh", "n": 30, "before": {"rouge-l": 25.0}, "after": {"rouge-l": 24.5},
                "delta": {"rouge-l": -0.5}, "loss_before": 2.0, "loss_after": 2.02}}}


def _run_folder(tmp_path: Path, plant: set[str], seed: int = 0, metrics: bool = True) -> Path:
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    # model/data need only be present (load_config checks neither exists for these strings)
    save_config(load_config(overrides={"model": "x", "data": ["y.json"]}), run / "config.yaml")
    syn = generate(np.random.default_rng(seed), plant, spike_steps=[200, 400, 1400, 2000] if "fluctuation" in plant else None)
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in syn.records) + "\n", encoding="utf-8")
    if metrics:
        (run / "eval" / "metrics.json").write_text(json.dumps(METRICS), encoding="utf-8")
    return run


def _external_refs(page: str) -> list[str]:
    """Every src/href that is not inline data or an in-page anchor, plus any script/link/import."""
    refs = [u for u in re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page, re.I)
            if not u.startswith(("data:", "#"))]
    refs += re.findall(r"<\s*(?:script|link|iframe|object|embed)\b", page, re.I)
    refs += re.findall(r"url\(|@import", page, re.I)
    return refs


def test_plot_loss_writes_a_small_png(tmp_path):
    run = _run_folder(tmp_path, {"fluctuation", "overfitting"})
    out = plot_loss(run)
    assert out == run / "loss.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and 10_000 < len(data) < 300_000


def test_report_is_self_contained_and_complete(tmp_path):
    run = _run_folder(tmp_path, {"fluctuation", "overfitting"})
    html_path, md_path = write_report(run, study={"per_model": {"base": {"mean": 2.4, "n": 30},
                                                                "tuned": {"mean": 3.6, "n": 30}}, "raters": 3})
    page = html_path.read_text(encoding="utf-8")
    md = md_path.read_text(encoding="utf-8")
    assert _external_refs(page) == []
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    for text in ("Diagnosis", "overfitting", "fluctuation", "Evaluation metrics", "rouge-l", "Blind test",
                 "Configuration", "learning_rate"):
        assert text in page and text in md
    assert "![loss curves](loss.png)" in md and (run / "loss.png").is_file()
    assert "| tuned | 3.6 | 30 |" in md
    assert "Verdict:" in md


def test_report_on_partial_run_folder(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    recs = [{"type": "train", "step": s, "loss": 2.0 - s / 1000} for s in range(10, 210, 10)]
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{broken", encoding="utf-8")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.md").write_text("| set | rouge-l |\n|---|---|\n| test | 31.0 |\n", encoding="utf-8")
    html_path, md_path = write_report(run)
    md = md_path.read_text(encoding="utf-8")
    assert "No config.yaml" in md and "| test | 31.0 |" in md
    assert _external_refs(html_path.read_text(encoding="utf-8")) == []


def test_report_on_empty_log(tmp_path):
    (tmp_path / "log.jsonl").write_text("", encoding="utf-8")
    html_path, md_path = write_report(tmp_path)
    md = md_path.read_text(encoding="utf-8")
    assert "insufficient_data" in md and "No problems found" not in md   # an empty log is no evidence of health
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_study_png_and_json_path(tmp_path):
    run = _run_folder(tmp_path, set(), metrics=False)
    png = plot_loss(run)
    study_json = tmp_path / "study.json"
    study_json.write_text(json.dumps({"models": [{"model": "base", "mean": 2.0}, {"model": "tuned", "mean": 3.0}]}))
    html_path, md_path = write_report(run, study=[str(study_json), png])
    page = html_path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert "| tuned | 3 |" in md_path.read_text(encoding="utf-8")


def test_study_tables_are_generic():
    t = study_tables({"n": 12, "results": {"means": {"a": 1.5, "b": 2.5}, "note": "x"}})
    assert [x[0] for x in t] == ["summary", "results"]
    assert t[1][2] == [["means.a", 1.5], ["means.b", 2.5], ["note", "x"]]
    # the shape `lorafit blind results` produces: per-dimension records with nested intervals
    blind = {"study": {"items": 20, "raters": 3},
             "models": {"a": {"name": "base"}, "b": {"name": "tuned"}},
             "dimensions": {"overall": {"n": 60, "a": {"mean": 2.9, "ci95": [2.6, 3.2]},
                                        "b": {"mean": 3.8, "ci95": [3.5, 4.1]}, "alpha": None}}}
    dims = {x[0]: x for x in study_tables(blind)}["dimensions"]
    assert dims[1] == ["name", "n", "a.mean", "a.ci95", "b.mean", "b.ci95", "alpha"]
    assert dims[2] == [["overall", 60, 2.9, "[2.6, 3.2]", 3.8, "[3.5, 4.1]", None]]


def test_missing_study_file_is_a_clean_error(tmp_path):
    from lorafit.errors import RunError

    run = _run_folder(tmp_path, set(), metrics=False)
    with pytest.raises(RunError):
        write_report(run, study=tmp_path / "nope.json")
