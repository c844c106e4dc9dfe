"""Crash-safe checkpoints (lorafit.training.checkpoint): manifest verification, damaged checkpoints
skipped with a warning (never loaded) in favour of the previous one, pruning to the last K, and a
resumed training run that steps over a damaged checkpoint and still ends exactly like an
uninterrupted one."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafit.training import checkpoint as C


def _model_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    m[1].weight.requires_grad_(False)  # a frozen tensor: not part of the checkpoint
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    return m, opt


def _save(root: Path, step: int, keep: int = 10) -> Path:
    m, opt = _model_and_opt(step)
    return C.save_checkpoint(root, step, model=m, optimizer=opt, state={"step": step, "log_lines": 3 * step}, keep=keep)


def test_manifest_lists_every_file_with_sha256(tmp_path):
    ck = _save(tmp_path, 1)
    man = json.loads((ck / C.MANIFEST).read_text())
    assert man["step"] == 1
    assert set(man["files"]) == {p.name for p in ck.iterdir()} - {C.MANIFEST}
    for name, meta in man["files"].items():
        assert meta["sha256"] == C._sha256(ck / name) and meta["bytes"] == (ck / name).stat().st_size
    assert C.verify(ck) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_roundtrip_restores_weights_optimizer_rng_and_state(tmp_path):
    m, opt = _model_and_opt(1)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ck = C.save_checkpoint(tmp_path, 7, model=m, optimizer=opt, state={"step": 7, "best_loss": 0.1}, keep=2)
    expect = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    m2, opt2 = _model_and_opt(2)
    state = C.load_checkpoint(ck, model=m2, optimizer=opt2)
    assert state == {"step": 7, "best_loss": 0.1}
    for (n, a), b in zip(m.named_parameters(), m2.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), n
    assert not torch.equal(m[1].weight, m2[1].weight)  # frozen weights are not checkpointed
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expect


def _truncate(ck: Path) -> None:
    f = ck / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:-10])


def _flip_byte(ck: Path) -> None:
    f = ck / "optimizer.pt"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01  # same size: only the checksum can tell
    f.write_bytes(bytes(b))


DAMAGE = {
    "truncated file": (_truncate, "trainable.safetensors does not match its checksum"),
    "flipped byte": (_flip_byte, "optimizer.pt does not match its checksum"),
    "deleted manifest": (lambda ck: (ck / C.MANIFEST).unlink(), "no manifest"),
    "garbage manifest": (lambda ck: (ck / C.MANIFEST).write_text("{not json"), "unreadable manifest"),
    "manifest without files": (lambda ck: (ck / C.MANIFEST).write_text('{"step": 2}'), "unreadable manifest"),
    "deleted file": (lambda ck: (ck / "rng.pt").unlink(), "missing rng.pt"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_is_skipped_with_warning(tmp_path, damage):
    _save(tmp_path, 1)
    latest = _save(tmp_path, 2)
    fn, reason = DAMAGE[damage]
    fn(latest)
    assert C.verify(latest).startswith(reason)
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*step-2: {reason}"):
        assert C.latest_valid(tmp_path) == tmp_path / "step-1"


def test_all_damaged_means_start_over(tmp_path):
    for s in (1, 2):
        (_save(tmp_path, s) / C.MANIFEST).unlink()
    with pytest.warns(UserWarning) as rec:
        assert C.latest_valid(tmp_path) is None
    assert len(rec) == 2


def test_interrupted_write_is_never_listed(tmp_path, monkeypatch):
    """A kill between writing the files and the rename leaves only a `.tmp-step-N-PID` folder."""
    _save(tmp_path, 1)
    real_replace = os.replace

    def die_on_rename(src, dst):
        if Path(src).name.startswith(".tmp-step-"):
            raise KeyboardInterrupt  # stands in for SIGKILL at the worst moment
        return real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", die_on_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-step-2-")]
    assert C.list_checkpoints(tmp_path) == [tmp_path / "step-1"]
    assert C.latest_valid(tmp_path) == tmp_path / "step-1"
    # The next save of any step clears the stale temporary folder.
    _save(tmp_path, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_listing_ignores_foreign_names(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 9)
    for junk in ("step-abc", ".tmp-step-11-123", "notes"):
        (tmp_path / junk).mkdir()
    (tmp_path / "step-12").write_text("a file, not a folder")
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step-9", "step-10"]  # numeric order


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_prune_keeps_last_k(tmp_path, keep):
    for s in range(1, 6):
        _save(tmp_path, s * 10, keep=keep)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == [f"step-{s * 10}" for s in range(6 - keep, 6)]


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from lorafit.errors import TrainingError

    m, opt = _model_and_opt()
    with torch.no_grad():
        m[0].weight[0, 0] = float("inf")
    with pytest.raises(TrainingError, match="non-finite.*0.weight"):
        C.save_checkpoint(tmp_path, 1, model=m, optimizer=opt, state={}, keep=2)
    assert C.list_checkpoints(tmp_path) == []


def test_save_adapter_atomic_replaces_whole_folder(tmp_path):
    class Fake:
        def __init__(self, payload: str) -> None:
            self.payload = payload

        def save_pretrained(self, d: str, safe_serialization: bool = True) -> None:
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / "adapter_model.safetensors").write_text(self.payload)

    out = tmp_path / "adapter"
    C.save_adapter_atomic(Fake("one"), out)
    (out / "stale.txt").write_text("from an older save")
    C.save_adapter_atomic(Fake("two"), out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ------------------------------------------------------------------------------------------------
# The training loop over a damaged checkpoint: tiny random Llama, in-process, a few seconds.
# ------------------------------------------------------------------------------------------------
def _cfg(model: str, data: Path, out: Path):
    from lorafit.config import load_config

    return load_config(None, dict(model=model, data=[str(data)], output_dir=str(out), device="cpu", lora_rank=4,
                                  lora_alpha=8, batch_size=2, max_steps=6, save_steps=2, save_total_limit=3,
                                  logging_steps=1, warmup_steps=1, max_length=64, eval_steps=1000))


def _records(run: Path) -> list[dict]:
    recs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs if r.get("event") != "resume"]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """Training data and one uninterrupted run of it, shared by the resume tests below."""
    from lorafit.training import loop

    d = tmp_path_factory.mktemp("resume")
    data = d / "data.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 1)))}
                                for i in range(8)]))
    return data, loop.train(_cfg(tiny_model_dir, data, d / "ref"), progress=False).run_dir


def _assert_same_run(run: Path, ref: Path) -> None:
    assert _records(run) == _records(ref)
    a, b = _adapter(run), _adapter(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # CPU: bit-identical
    from lorafit.rundir import MARKER

    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != MARKER]  # no temporary, no lock


def test_resume_skips_damaged_checkpoint_and_matches_uninterrupted(tiny_model_dir, reference, tmp_path,
                                                                    kill_training_at):
    from lorafit.training import loop

    data, ref = reference
    run = tmp_path / "run"
    kill_training_at(5)  # the process dies during step 5
    with pytest.raises(KeyboardInterrupt):
        loop.train(_cfg(tiny_model_dir, data, run), progress=False)
    kill_training_at(None)
    assert [p.name for p in C.list_checkpoints(run / "checkpoints")] == ["step-2", "step-4"]
    _flip_byte(run / "checkpoints" / "step-4")

    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step-4"):
        res = loop.train(_cfg(tiny_model_dir, data, run), progress=False)
    assert res.resumed_from == 2
    resumes = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if '"resume"' in ln]
    assert [r["checkpoint"] for r in resumes] == ["step-2"]
    _assert_same_run(run, ref)


def test_crash_while_saving_final_adapter(tiny_model_dir, reference, tmp_path, monkeypatch):
    """Killed between moving the old adapter aside and renaming the new one in: no adapter/ at all;
    the same command again finishes the run as if nothing happened."""
    from lorafit.training import loop

    data, ref = reference
    run = tmp_path / "run"
    real_replace = os.replace

    def die_on_adapter_rename(src, dst):
        if Path(src).name == ".adapter.tmp":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", die_on_adapter_rename)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_cfg(tiny_model_dir, data, run), progress=False)
    monkeypatch.undo()
    assert not (run / "adapter").exists() and (run / ".adapter.tmp").is_dir()
    assert not loop.finished(run)
    res = loop.train(_cfg(tiny_model_dir, data, run), progress=False)
    assert res.resumed_from == 4  # the last checkpoint before the end (save_steps 2, 6 steps)
    _assert_same_run(run, ref)


def test_crash_while_log_is_cut_back_on_resume(tiny_model_dir, reference, tmp_path, monkeypatch, kill_training_at):
    """On resume, log.jsonl is cut back to the lines the checkpoint had seen. A kill at the worst
    moment of that rewrite (the file truncated but not yet rewritten, or the new copy not yet renamed
    in) must not lose the lines before the checkpoint."""
    import builtins
    import io

    from lorafit.training import loop

    data, ref = reference
    run = tmp_path / "run"
    kill_training_at(5)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_cfg(tiny_model_dir, data, run), progress=False)
    kill_training_at(None)

    real_io_open, real_replace = io.open, os.replace

    def killing_open(file, mode="r", *a, **k):
        f = real_io_open(file, mode, *a, **k)
        if Path(file).name == "log.jsonl" and "w" in mode:
            f.close()  # truncated, nothing rewritten yet
            raise KeyboardInterrupt
        return f

    def killing_replace(src, dst):
        if Path(dst).name == "log.jsonl":
            raise KeyboardInterrupt  # the new copy is written but not renamed in
        return real_replace(src, dst)

    for mod, name, fn in ((io, "open", killing_open), (builtins, "open", killing_open),
                          (os, "replace", killing_replace)):
        monkeypatch.setattr(mod, name, fn)
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.train(_cfg(tiny_model_dir, data, run), progress=False)
    finally:
        monkeypatch.undo()
    res = loop.train(_cfg(tiny_model_dir, data, run), progress=False)
    assert res.resumed_from == 4
    _assert_same_run(run, ref)
