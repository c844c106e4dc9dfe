"""benchmarks/bench_speed.py's arguments: row names contain commas, so `--rows` is read against the known
names (longest match first); an unknown row or parity config stops the run (exit 2) before any work."""
from __future__ import annotations

import importlib.util
import sys
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


@pytest.mark.parametrize("bad,said", [(["--rows", "baseline,ours+fast"], "cannot read 'ours+fast'"),
                                      (["--parity-configs", "seeded,fastest"], "unknown ['fastest']")])
def test_bad_arguments_stop_the_run_before_any_work(tmp_path, monkeypatch, capsys, bad, said):
    """Exit 2 with the reason, before a model is built or the output file is written."""
    bench = _bench()
    out = tmp_path / "x.json"
    monkeypatch.setattr(sys, "argv", ["bench_speed.py", *bad, "--out", str(out)])
    monkeypatch.setattr(bench, "build", lambda *a, **k: pytest.fail("built a model despite bad arguments"))
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and said in capsys.readouterr().err
    assert not out.exists()
