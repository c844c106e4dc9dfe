"""lorafit.rundir against docs/run-folder.md: every name of the layout and every log record type, event
and field that the builders produce is named on that page, and the page names no entry, record type
or event that rundir does not have. (test_train.py checks the page against a real run's folder too.)"""
import re
from pathlib import Path

import pytest

from lorafit import rundir as R

DOC = (Path(__file__).resolve().parents[2] / "docs" / "run-folder.md").read_text(encoding="utf-8")
TABLE, LOG_SECTION = DOC.split("## `log.jsonl` records")


def _backticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", text))


def _table_rows() -> dict[str, str]:
    """First-column path (without a trailing /) -> the whole row, for every row of the layout table."""
    rows = {}
    for line in TABLE.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            for path in _backticked(first):
                rows[path.rstrip("/")] = line
    return rows


def _pattern(doc_name: str) -> re.Pattern:
    """`eval/predictions-<model>-<set>.jsonl` -> a regex where each <placeholder> is one or more characters."""
    return re.compile("".join(".+" if p.startswith("<") else re.escape(p) for p in re.split(r"(<[^>]+>)", doc_name)))


def test_every_layout_constant_is_a_name_of_rundir_s_groups():
    """A new path constant in rundir.py must join a group below, so this test checks it against the page."""
    record_names = set(R.RECORD_TYPES) | set(R.EVENTS)
    grouped = set(R.RUN_ENTRIES) | set(R.EVAL_FILES) | set(R.CHECKPOINT_FILES) | {R.SELECTED_CHOICE, R.STEP_PREFIX}
    loose = {k for k, v in vars(R).items() if k.isupper() and isinstance(v, str)
             and v not in record_names and v not in grouped}
    assert not loose, sorted(loose)


def test_doc_names_every_path_of_the_layout_and_no_other():
    rows = _table_rows()
    tops = {p.split("/")[0] for p in rows}
    assert set(R.RUN_ENTRIES) <= tops, sorted(set(R.RUN_ENTRIES) - tops)
    assert tops <= set(R.RUN_ENTRIES), f"the page lists entries rundir.py lacks: {sorted(tops - set(R.RUN_ENTRIES))}"
    eval_names = [p.split("/", 1)[1] for p in rows if p.startswith(R.EVAL_DIR + "/")]
    missing = [n for n in R.EVAL_FILES if n not in eval_names]
    assert not missing, missing
    produced = list(R.EVAL_FILES) + [R.predictions_name("tuned", "my set"), R.benchmark_name("mmlu", 5)]
    for name in eval_names:  # every eval/ name on the page is one rundir produces
        assert any(_pattern(name).fullmatch(n) for n in produced), f"eval/{name} is not a name rundir.py produces"
    assert R.predictions_name("base", "a/b c") == "predictions-base-a_b_c.jsonl"
    ckpt_row = next(row for p, row in rows.items() if p.startswith(R.CHECKPOINTS + "/"))
    assert f"{R.CHECKPOINTS}/{R.STEP_PREFIX}N/" in _backticked(ckpt_row.split("|")[1])
    assert set(R.CHECKPOINT_FILES) <= _backticked(ckpt_row), sorted(set(R.CHECKPOINT_FILES) - _backticked(ckpt_row))
    assert R.SELECTED_CHOICE in _backticked(rows[R.SELECTED_ADAPTER])


def _doc_records() -> dict[str, list[str]]:
    """Record type -> the fields the page lists in its `{"type": "...", "field", ...}` line."""
    found = {}
    for m in re.finditer(r'\{"type": "(\w+)"((?:, "\w+")*)', LOG_SECTION):
        found[m.group(1)] = ["type"] + re.findall(r'"(\w+)"', m.group(2))
    return found


def _doc_events() -> dict[str, str]:
    """Event name -> its bullet's text, for the bullets `  - `name` ...` under the event record."""
    events, current = {}, None
    for line in LOG_SECTION.splitlines():
        m = re.match(r"  - `(\w+)`", line)
        if m:
            current = m.group(1)
            events[current] = line
        elif current is not None and line.startswith("    "):
            events[current] += " " + line.strip()
        else:
            current = None
    return events


def test_doc_lists_every_record_type_with_the_builders_fields():
    built = {R.TYPE_TRAIN: R.train_record(10, 0.5, 2.0, 1e-4, 0.7, 1234.56),
             R.TYPE_EVAL: R.eval_record(10, "val", 1.9),
             R.TYPE_EVENT: R.event(1, R.DIVERGED, reason="x")}
    assert set(built) == set(R.RECORD_TYPES) == set(R.RECORD_FIELDS)
    doc = _doc_records()
    assert set(doc) == set(R.RECORD_TYPES), f"page: {sorted(doc)}, rundir: {sorted(R.RECORD_TYPES)}"
    for kind, rec in built.items():
        base = [k for k in rec if kind != R.TYPE_EVENT or k in R.RECORD_FIELDS[kind]]
        assert base == list(R.RECORD_FIELDS[kind]) == doc[kind], kind


def test_doc_lists_every_event_with_its_fields_and_no_other():
    doc = _doc_events()
    assert set(doc) == set(R.EVENTS), f"page: {sorted(doc)}, rundir: {sorted(R.EVENTS)}"
    for name, fields in R.EVENT_FIELDS.items():
        rec = R.event(3, name, **{f: None for f in fields})
        assert list(rec) == list(R.RECORD_FIELDS[R.TYPE_EVENT]) + list(fields)
        missing = [f for f in fields if f not in _backticked(doc[name])]
        assert not missing, f"event {name}: the page does not name {missing}"


def test_builders_refuse_what_the_contract_does_not_declare():
    with pytest.raises(ValueError, match="unknown log event"):
        R.event(1, "restart")
    with pytest.raises(ValueError, match="unknown fields"):
        R.event(1, R.DIVERGED, reason="x", extra=1)
    with pytest.raises(ValueError, match="missing fields"):
        R.event(1, R.RESUME, checkpoint="step-2")
    end = R.event(5, R.END, best_step=None, best_loss=None, final_eval={})  # the optional fields may be left out
    assert "peak_memory_gib" not in end and end["event"] == R.END
    rec = R.train_record(7, 0.123456, 2.0, 1e-4, 0.5, 999.94)
    assert rec["epoch"] == 0.1235 and rec["tokens_per_s"] == 999.9
