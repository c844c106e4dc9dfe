"""experiments/tables.py's rerun section: every fix run under results/rerun/runs/ gets its deltas, and
"domain gain kept" and "degradation cut" against the rerun's bitext, with intervals (two tiny fake runs)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tables():
    spec = importlib.util.spec_from_file_location("experiments_tables", ROOT / "experiments" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REFS = ["please reset your password in the account settings page",
        "you can track your order from the orders page",
        "we refund within five business days of the return",
        "contact support by chat or by email at any time",
        "change the shipping address before the order ships",
        "delete your account from the privacy settings"]
BASE_LOSS = [10.0] * 6                       # 5 tokens each: general loss 2.0 before
REF_TUNED_LOSS = [11, 12, 13, 12, 11, 13]    # 72 / 30 = 2.4: Δ +0.4
FIX_TUNED_LOSS = [10.5, 11.5, 11, 10.5, 11.5, 11]  # 66 / 30 = 2.2: Δ +0.2, so the cut is 50%


def _write(path: Path, preds: list[str], losses: list[float] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, (p, ref) in enumerate(zip(preds, REFS)):
            rec = {"prompt": f"q{i}", "predict": p, "label": ref}
            if losses is not None:
                rec |= {"loss_sum": losses[i], "loss_tokens": 5}
            f.write(json.dumps(rec) + "\n")


def _run(d: Path, tuned: list[str], tuned_loss: list[float], losses: bool = True) -> None:
    base = ["hello, how can I help you today"] * 6
    for s in ("seen", "unseen", "general"):
        _write(d / "eval" / f"predictions-base-{s}.jsonl", base, BASE_LOSS if losses else None)
        _write(d / "eval" / f"predictions-tuned-{s}.jsonl", tuned, tuned_loss if losses else None)


def test_rerun_section_gives_every_fix_gain_kept_and_cut_with_intervals(tmp_path):
    t = _tables()
    runs = tmp_path / "rerun" / "runs"
    _run(runs / "bitext", REFS, REF_TUNED_LOSS)
    half = [" ".join(r.split()[: len(r.split()) // 2]) for r in REFS]
    _run(runs / "bitext-mix20", half, FIX_TUNED_LOSS)
    _run(runs / "bitext-lr1e-5", half, FIX_TUNED_LOSS, losses=False)   # predictions without per-prompt losses
    (runs / "bitext-earlystop").mkdir()                                  # cut off before its evaluation
    lines = t.rerun_section(tmp_path / "rerun")
    text = "\n".join(lines)

    # Δ rows for the reference and each evaluated fix, ROUGE-L and loss with intervals
    for run in ("bitext", "bitext-mix20"):
        for s in ("seen", "unseen", "general"):
            assert re.search(rf"^\| {run} \| {s} \| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] \| "
                             rf"[+-]\d\.\d{{3}} \[[+-]\d\.\d{{3}}, [+-]\d\.\d{{3}}\] \|$", text, re.M), (run, s)
    assert "| bitext-lr1e-5 | general | " in text and text.count("| bitext-lr1e-5 | ") == 4  # 3 Δ rows + 1 summary
    # gain kept and degradation cut, both with intervals that contain the point; the cut is 50% by hand
    row = re.search(r"^\| bitext-mix20 \| (\d+)% \[(\d+), (\d+)\] \| (\d+)% \[(\d+), (\d+)\] \|$", text, re.M)
    assert row, text
    kept, klo, khi, cut, clo, chi = map(int, row.groups())
    assert klo <= kept <= khi and 0 < kept < 100
    assert cut == 50 and clo <= 50 <= chi and clo < chi
    # no per-prompt losses: the gain kept still has its interval, the cut says why it has none
    assert re.search(r"^\| bitext-lr1e-5 \| \d+% \[\d+, \d+\] \| — \(no per-prompt losses\) \|$", text, re.M)
    assert "Not evaluated (no predictions), left out: bitext-earlystop." in text
    assert "bitext-earlystop |" not in text

    # the check of docs/results.md names exactly the rows a doc lacks
    doc = tmp_path / "results.md"
    doc.write_text("\n".join(lines[:-3]) + "\n", encoding="utf-8")
    assert t.check(lines, doc) == [l for l in lines[-3:] if l.startswith("|")]


def test_rerun_section_without_fixes_has_no_summary(tmp_path):
    t = _tables()
    _run(tmp_path / "rerun" / "runs" / "bitext", REFS, REF_TUNED_LOSS)
    lines = t.rerun_section(tmp_path / "rerun")
    assert len(lines) == 2 + 3 and "fix run" not in "\n".join(lines)
