"""benchmarks/bench_packing.py end to end on CPU with a tiny random model: every run is `lorafit train`
itself (the same seed, so the same adapter init and data), each plan covers the epoch's examples exactly
once, the LR rule moves the packed runs' peak LR, and lorafit's defaults on padded pairs follow the
baseline's trajectory (the check that the comparison is fair)."""
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
                      "--val-data", _data(tmp_path / "val.json", 4, offset=100), "--work", str(tmp_path / "runs"),
                      "--variants", "budget256,padded,budget512-sqrt", "--out", str(out)])
    assert json.loads(out.read_text())["primary"] == "budget256"
    runs = res["runs"]
    assert set(runs) == {"baseline", "budget256", "padded", "budget512-sqrt"}
    assert all("error" not in r for r in runs.values()), runs
    assert runs["baseline"]["steps"] == runs["padded"]["steps"] == 6
    assert runs["baseline"]["step_kind"] == "eager"
    for r in runs.values():  # every plan covers the epoch's examples exactly once
        assert r["useful_tokens"] == res["data"]["train_tokens"]
        assert r["epoch_s"] > 0 and r["initial_val_loss"] == pytest.approx(res["initial_val_loss"])
        assert r["final_val_loss"] < res["initial_val_loss"] + 0.5
    # Same pairs, steps and LR (CPU: fused_kernels auto is off, so the same eager step): same final loss.
    assert res["ratios"]["padded"]["val_loss_rel_diff"] < 0.01
    for name in ("budget256", "budget512-sqrt"):
        packed = runs[name]
        assert packed["steps"] < 6 and packed["peak_lr"] > runs["baseline"]["peak_lr"]
        assert packed["examples_per_step"] > 2
    assert "epoch_time_ratio" in res and "val_loss_rel_diff" in res


def test_unknown_variant_stops_before_any_work(capsys):
    with pytest.raises(SystemExit) as e:
        _bench().parse_args(["--variants", "budget512+graph"])
    assert e.value.code == 2 and "unknown variant 'budget512+graph'" in capsys.readouterr().err
