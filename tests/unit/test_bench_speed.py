"""benchmarks/bench_speed.py's row selection: row names contain commas, so `--rows` is read against the
known names (longest match first), and an unknown name stops the run before any model is built."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KNOWN = {"baseline": 1, "ours": 1, "ours+graph": 1, "ours+graph,seeded": 1}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "benchmarks" / "bench_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_with_commas_in_their_names():
    split = _bench()._split_rows
    assert split("baseline,ours+graph,seeded", KNOWN) == ["baseline", "ours+graph,seeded"]
    assert split("ours+graph,seeded,baseline", KNOWN) == ["ours+graph,seeded", "baseline"]
    assert split("ours+graph,baseline", KNOWN) == ["ours+graph", "baseline"]


def test_unknown_row_stops_the_run():
    with pytest.raises(SystemExit, match=re.escape("cannot read 'ours+fast'")):
        _bench()._split_rows("baseline,ours+fast", KNOWN)
