"""benchmarks/bench_packing.py end to end on CPU with a tiny random model: every run trains from the
same adapter, the packed plans cover the same examples, and packing the baseline's own pairs follows
the baseline's trajectory (the check that the comparison is fair)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_packing", ROOT / "benchmarks" / "bench_packing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data(path: Path, n: int, offset: int = 0) -> str:
    rows = [{"instruction": f"How do I {w} order {i + offset}?", "input": "",
             "output": f"To {w} order {i + offset}, open your account, pick the order and choose '{w}'. " * (1 + i % 3)}
            for i, w in enumerate(["cancel", "track", "change", "return"] * (n // 4))]
    path.write_text(json.dumps(rows))
    return str(path)


def test_bench_packing_cpu(tmp_path, tiny_model_dir):
    bench = _bench()
    out = tmp_path / "packing.json"
    res = bench.main(["--model", tiny_model_dir, "--device", "cpu", "--data", _data(tmp_path / "train.json", 12),
                      "--val-data", _data(tmp_path / "val.json", 4, offset=100), "--val", "4",
                      "--variants", "budget256+graph,pairs,budget512-sqrt", "--out", str(out)])
    assert json.loads(out.read_text())["primary"] == "budget256+graph"
    runs = res["runs"]
    assert set(runs) == {"baseline", "budget256+graph", "pairs", "budget512-sqrt"}
    assert all("error" not in r for r in runs.values()), runs
    assert runs["baseline"]["steps"] == runs["pairs"]["steps"] == 6
    assert runs["budget256+graph"]["graph"] is False and "graph_skipped" in runs["budget256+graph"]
    for r in runs.values():  # every plan covers the epoch's examples exactly once
        assert r["useful_tokens"] == res["data"]["train_tokens"]
        assert r["final_val_loss"] < res["initial_val_loss"] + 0.5
    # Same pairs, steps and LR: only dropout masks differ, so the final losses agree closely.
    assert res["ratios"]["pairs"]["val_loss_rel_diff"] < 0.01
    budget = runs["budget512-sqrt"]
    assert budget["steps"] < 6 and budget["peak_lr"] > runs["baseline"]["peak_lr"]
    assert "epoch_time_ratio" in res and "val_loss_rel_diff" in res
