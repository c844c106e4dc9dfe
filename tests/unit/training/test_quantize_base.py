"""`quantize_base: fp8` in `lorafit train`: the run trains through the fused products' FP8 GEMMs (on CPU
through torch's reference FP8 products, with `fused_kernels: true`), says so in its start event, lands near
the unquantized run, and is refused with exit status 2 and no output folder where it cannot run."""
from __future__ import annotations

import json

import pytest

from lorafit.cli import main
from lorafit.config import load_config
from lorafit.demoset import write_demo_data
from lorafit.kernels.fp8 import fp8_supported
from lorafit.training import loop


def _cfg(tmp_path, model, name, **kw):
    train, val = write_demo_data(tmp_path / "data")
    return load_config(None, {"model": model, "data": [str(train)], "val_data": {"faq": str(val)},
                              "output_dir": str(tmp_path / name), "max_steps": 4, "max_length": 128, "batch_size": 2,
                              "eval_steps": 4, "logging_steps": 1, "learning_rate": 1e-3, "device": "cpu",
                              "lora_dropout": 0.0, "fused_kernels": True, **kw})


def _log(run):
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(fp8_supported("cpu") is not None, reason="this torch has no FP8 products on CPU")
@pytest.mark.parametrize("cuda_graph", [True], ids=["bucketed"])  # the eager fused step: tests/unit/kernels/test_fp8.py
def test_fp8_base_trains_near_the_model_dtype(tmp_path, tiny_model_dir, cuda_graph):
    plain = loop.train(_cfg(tmp_path, tiny_model_dir, "plain", cuda_graph=cuda_graph), progress=False)
    fp8 = loop.train(_cfg(tmp_path, tiny_model_dir, "fp8", cuda_graph=cuda_graph, quantize_base="fp8"), progress=False)
    lp, lf = _log(plain.run_dir), _log(fp8.run_dir)
    assert "fp8_copies_gib" not in lp[0] and lf[0]["fp8_copies_gib"] > 0
    assert lf[0]["fp8_offloaded_gib"] == 0  # on CPU the weights already live in host memory
    assert lf[0]["step_kind"] == lp[0]["step_kind"]
    losses = lambda L: [r.get("loss", r.get("eval_loss")) for r in L if r["type"] in ("train", "eval")]
    a, b = losses(lp), losses(lf)
    assert len(a) == len(b) >= 5  # 4 train records, the evaluations at steps 0 and 4
    assert a != b  # the frozen products really ran quantized
    assert all(abs(x - y) <= 0.02 * abs(x) for x, y in zip(a, b)), (a, b)


def test_fp8_where_it_cannot_run_is_a_config_error(tmp_path, tiny_model_dir, capsys):
    """`fused_kernels: auto` is off on CPU: fp8 would silently run unquantized, so it is refused."""
    train, _ = write_demo_data(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: [{train}]\ndevice: cpu\nmax_steps: 1\n")
    code = main(["train", str(config), f"--output_dir={tmp_path / 'out'}", "--quantize_base=fp8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "quantize_base" in err and "fused kernels" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
