"""benchmarks/bench_speed.py on CPU with a tiny random model: every row runs (the baseline in this process,
the lorafit rows through `lorafit.train` itself, whose log gives their figures), the rows see the same
micro-batches, and bad arguments stop the run (exit 2) before any work."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: tiny models gain nothing from two, and lose much when the cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/bench_speed.py` has it
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "benchmarks" / "bench_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_speed_cpu(tmp_path, monkeypatch, tiny_model_dir):
    bench = _bench(monkeypatch)
    out = tmp_path / "speed.json"
    res = bench.main(["--device", "cpu", "--model-dir", tiny_model_dir, "--steps", "1", "--warmup", "1",
                      "--length", "64", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text())["runs"].keys() == res["runs"].keys()
    runs = res["runs"]
    assert set(runs) == {"baseline", "lorafit-eager", "lorafit-fused", "lorafit"}
    assert all("error" not in r for r in runs.values()), runs
    for r in runs.values():
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 2
    # The lorafit rows are lorafit train's own runs: the step each took is the one its log names.
    assert runs["lorafit-eager"]["step_kind"] == "eager"
    assert runs["lorafit-fused"]["step_kind"] == "eager_fused"
    assert runs["lorafit"]["step_kind"] in ("eager", "eager_fused")  # CPU: fused_kernels auto is off
    # Same adapter init, data and order: the first step's loss (before any update) agrees closely.
    first = runs["baseline"]["losses"][0]
    assert all(abs(r["losses"][0] - first) / first < 0.02 for r in runs.values())
    assert "ratio:lorafit(no ckpt)" in res and "loss_vs_baseline" in runs["lorafit"]


@pytest.mark.parametrize("bad,said", [(["--rows", "baseline,ours+fast"], "unknown ['ours+fast']"),
                                      (["--rows", "baseline", "--levers"], "unrecognized arguments: --levers")])
def test_bad_arguments_stop_the_run_before_any_work(tmp_path, monkeypatch, capsys, bad, said):
    """Exit 2 with the reason, before a model is built or the output file is written."""
    bench = _bench(monkeypatch)
    out = tmp_path / "x.json"
    monkeypatch.setattr(bench, "build_model_folder", lambda *a, **k: pytest.fail("built a model despite bad arguments"))
    with pytest.raises(SystemExit) as e:
        bench.main([*bad, "--out", str(out)])
    assert e.value.code == 2 and said in capsys.readouterr().err
    assert not out.exists()
