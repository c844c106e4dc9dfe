"""Several processes as a user runs them (gloo on CPU, the same code as NCCL on GPUs): no hang for any
validation size, eval batch size, early stopping or a NaN on one rank; a stuck collective stops the run
with one line naming the phase; errors under torchrun are one line, exit 2.

Each torchrun launch trains several configs in the same processes (tests/unit/training/dist_probe.py), and each
N-process run is compared with one process at the same global batch (gradient_accumulation_steps N). One
launch per process count (`launch`): the 2-process one also holds the watchdog test's stuck run, last.
Every launch runs under a timeout, so a hang fails the test instead of stalling CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit.config import load_config
from lorafit.demoset import write_demo_data

PROBE = Path(__file__).with_name("dist_probe.py")
VAL_SIZES = (1, 2, 7, 8, 9)


def _data(tmp: Path) -> tuple[Path, dict[str, str]]:
    train, val = write_demo_data(tmp / "data")
    rows = json.loads(Path(train).read_text(encoding="utf-8")) + json.loads(Path(val).read_text(encoding="utf-8"))
    sets = {}
    for n in VAL_SIZES:
        p = tmp / "data" / f"val{n}.json"
        p.write_text(json.dumps(rows[-n:], ensure_ascii=False), encoding="utf-8")
        sets[f"v{n}"] = str(p)
    return Path(train), sets


def _cfg(tmp: Path, model: str, name: str, ga: int, **kw) -> Path:
    train, sets = _data(tmp) if not (tmp / "data").exists() else (tmp / "data" / "train.json",
                                                                   {f"v{n}": str(tmp / "data" / f"val{n}.json") for n in VAL_SIZES})
    cfg = {"model": model, "data": [str(train)], "val_data": sets, "output_dir": str(tmp / name), "max_steps": 4,
           "max_length": 64, "batch_size": 2, "gradient_accumulation_steps": ga, "eval_steps": 2, "logging_steps": 1,
           "save_steps": 2, "learning_rate": 1e-3, "device": "cpu", "early_stopping_patience": 1, **kw}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _torchrun(n: int, spec: list[dict], tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    sp = tmp / f"spec-{time.monotonic_ns()}.json"
    sp.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           str(PROBE), str(sp)], capture_output=True, text=True, env=env, timeout=timeout)


EBS = (1, 4, 8)


def _nan_at(nproc: int, ebs: int, nan_rank: int = 1) -> int | None:
    """In the eval_batch_size-4 run, step 2's micro-batch of rank `nan_rank` is NaN (step 2's micro-batches
    are nproc..2*nproc-1; rank r takes nproc + r)."""
    return nproc * 1 + nan_rank if ebs == 4 else None


@pytest.fixture(scope="module")
def launch(tmp_path_factory, tiny_model_dir):
    """`launch(nproc)` -> (folder, finished process, time it ended): one torchrun launch per process count,
    made on first use, training `n{nproc}-e{ebs}` for every eval batch size; the 2-process launch then runs
    `stuck` (rank 1 never arrives at the step-0 evaluation; dist_timeout 4 s), which ends it."""
    done: dict[int, tuple[Path, subprocess.CompletedProcess, float] | BaseException] = {}

    def get(nproc: int):
        if nproc not in done:
            tmp = tmp_path_factory.mktemp(f"nproc{nproc}")
            spec = [{"config": str(_cfg(tmp, tiny_model_dir, f"n{nproc}-e{ebs}", ga=1, eval_batch_size=ebs)),
                     "nan_at": _nan_at(nproc, ebs)} for ebs in EBS]
            if nproc == 2:
                spec.append({"config": str(_cfg(tmp, tiny_model_dir, "stuck", ga=1, dist_timeout=4)), "hang_rank": 1})
            try:
                r = _torchrun(nproc, spec, tmp)
                done[nproc] = (tmp, r, time.time())
            except subprocess.TimeoutExpired as e:  # a hang: every test of this launch fails, none waits again
                done[nproc] = e
        if isinstance(done[nproc], BaseException):
            raise done[nproc]
        return done[nproc]

    return get


def _exits(cfg: Path, nproc: int) -> list[str | None]:
    """Each rank's CLI status for the run of `cfg` (None: the rank never returned from it)."""
    return [(cfg.parent / f"{cfg.name}.exit-{r}").read_text() if (cfg.parent / f"{cfg.name}.exit-{r}").exists()
            else None for r in range(nproc)]


def _records(run: Path) -> list[tuple]:
    recs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    return [(r["type"], r["step"], r.get("split"), r.get("event"), r.get("loss", r.get("eval_loss")))
            for r in recs if r["type"] in ("train", "eval") or r.get("event") in ("nonfinite_skip", "early_stop")]


def _same_run(a: Path, b: Path) -> None:
    ra, rb = _records(a), _records(b)
    assert [r[:4] for r in ra] == [r[:4] for r in rb]
    for x, y in zip(ra, rb):
        if x[4] is not None:
            assert abs(x[4] - y[4]) <= 1e-5 * max(1.0, abs(x[4])), (x, y)
    wa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("nproc", [2, 3])
def test_matrix_matches_one_process(launch, tiny_model_dir, nproc):
    """Validation sets of 1, 2, 7, 8, 9 examples; eval_batch_size 1, 4, 8; early stopping on; in the
    eval_batch_size-4 run, one rank's micro-batch is NaN (step 2): every rank must skip that step."""
    import importlib.util

    tmp, r, _ = launch(nproc)
    for ebs in EBS:
        assert _exits(tmp / f"n{nproc}-e{ebs}.yaml", nproc) == ["0"] * nproc, (ebs, r.stderr[-4000:])
    if nproc != 2:  # the 2-process launch ends with the watchdog test's stuck run
        assert r.returncode == 0, r.stderr[-4000:]

    probe = importlib.util.spec_from_file_location("dist_probe", PROBE)
    mod = importlib.util.module_from_spec(probe)
    probe.loader.exec_module(mod)
    from lorafit.training import loop

    for ebs in EBS:  # one process, N-fold accumulation: the same global batch
        nan_at = _nan_at(nproc, ebs)
        mod.inject(nan_at, None)
        try:
            loop.train(load_config(_cfg(tmp, tiny_model_dir, f"one-e{ebs}", ga=nproc, eval_batch_size=ebs)),
                       progress=False)
        finally:
            mod.inject(None, None)
        many, one = tmp / f"n{nproc}-e{ebs}", tmp / f"one-e{ebs}"
        _same_run(one, many)
        recs = [json.loads(ln) for ln in (many / "log.jsonl").read_text().splitlines()]
        assert recs[0]["world_size"] == nproc and recs[0]["global_batch_size"] == 2 * nproc
        assert {r["split"] for r in recs if r["type"] == "eval"} == {f"v{n}" for n in VAL_SIZES}
        if nan_at is not None:
            assert [r["step"] for r in recs if r.get("event") == "nonfinite_skip"] == [2]
        assert not (many / ".lock").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_watchdog_names_the_phase_instead_of_hanging(launch):
    tmp, r, end = launch(2)
    cfg = tmp / "stuck.yaml"
    assert _exits(cfg, 2) == [None, None], r.stderr[-3000:]  # neither rank came back from the stuck run
    took = end - float((tmp / "stuck.yaml.start-0").read_text())
    assert r.returncode != 0 and took < 120, (took, r.stderr[-3000:])
    assert "waited more than 4 s in evaluation of 'v1' at step 0 (dist_timeout)" in r.stderr, r.stderr[-3000:]
    out = tmp / "stuck"
    assert not (out / "adapter").exists() and not (out / ".lock").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_errors_under_nproc_are_one_line(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, "bad", ga=1)
    bad = tmp_path / "data" / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "lorafit", "train", str(cfg), f"--data={bad}", "--nproc", "2",
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "bad.jsonl" in errors[0] and "output" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()


def test_nproc_must_be_positive(tmp_path, tiny_model_dir, capsys):
    from lorafit.cli import main

    assert main(["train", str(_cfg(tmp_path, tiny_model_dir, "neg", ga=1)), "--nproc", "-1"]) == 2
    assert "--nproc" in capsys.readouterr().err and not (tmp_path / "neg").exists()
