"""The bucketed step (`cuda_graph`): what a CUDA graph replays on a GPU, run here without capture. It must
train like the eager fused step (same losses and adapter within float noise), padded or packed, skip a
non-finite step, and resume a killed run bit-identically; so must the pipelined loop (optimizer step guarded
on the device, outcome read one step later). Bucketing and the one-row batch are checked directly."""
from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from lorafit.config import load_config
from lorafit.demoset import write_demo_data
from lorafit.training import loop
from lorafit.training.graphstep import bucket_length, flat_batch, segment_slots


def _cfg(tmp_path, model, name, **kw):
    train, val = write_demo_data(tmp_path / "data")
    return load_config(None, {"model": model, "data": [str(train)], "val_data": {"faq": str(val)},
                              "output_dir": str(tmp_path / name), "max_steps": 6, "max_length": 200, "batch_size": 2,
                              "gradient_accumulation_steps": 2, "eval_steps": 3, "logging_steps": 1, "save_steps": 2,
                              "learning_rate": 1e-3, "device": "cpu", "fused_kernels": True, **kw})


def _log(run):
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]


def _adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(params=[False, True], ids=["sync", "pipelined"])
def pipelined(request, monkeypatch):
    monkeypatch.setattr(loop, "PIPELINE", request.param)
    return request.param


def test_bucket_lengths_and_one_row_batches():
    assert [bucket_length(n, 1024) for n in (1, 128, 129, 1000, 1024)] == [128, 128, 256, 1024, 1024]
    assert bucket_length(300, 200) == 300 and bucket_length(150, 200) == 200  # never past the budget, never cut
    assert [segment_slots(n) for n in (1, 2, 7, 8, 15, 16)] == [8, 8, 8, 16, 16, 24]
    ids, labels = [[5, 6, 7], [8, 9]], [[-100, 6, 7], [-100, 9]]
    b = flat_batch(ids, labels, budget=400, pad_id=2)
    assert b["input_ids"].shape == (1, 128) and b["input_ids"][0, :5].tolist() == [5, 6, 7, 8, 9]
    assert b["input_ids"][0, 5:].eq(2).all() and b["labels"][0, 5:].eq(-100).all()
    # each example's first label is dropped: the padded batch's supervised tokens (HF shifts labels by one)
    assert b["labels"][0, :5].tolist() == [-100, 6, 7, -100, 9]
    assert b["position_ids"][0, :6].tolist() == [0, 1, 2, 0, 1, 0]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5, 128, 128, 128, 128, 128, 128]  # 2 examples, filler, empties
    assert b["max_length_q"] == 128


@pytest.mark.parametrize("dropout,pipe", [(0.0, False), (0.1, True)], ids=["sync-nodropout", "pipelined-dropout"])
def test_bucketed_step_trains_like_the_eager_fused_step(tmp_path, tiny_model_dir, monkeypatch, dropout, pipe):
    monkeypatch.setattr(loop, "PIPELINE", pipe)
    eager = loop.train(_cfg(tmp_path, tiny_model_dir, "eager", cuda_graph=False, lora_dropout=dropout), progress=False)
    fast = loop.train(_cfg(tmp_path, tiny_model_dir, "fast", cuda_graph=True, lora_dropout=dropout), progress=False)
    le, lf = _log(eager.run_dir), _log(fast.run_dir)
    assert le[0]["step_kind"] == "eager_fused" and lf[0]["step_kind"] == "bucketed" and lf[0]["step"] == 0
    pick = lambda L: [(r["type"], r["step"], r.get("loss", r.get("eval_loss"))) for r in L if r["type"] in ("train", "eval")]
    for a, b in zip(pick(le), pick(lf), strict=True):
        assert a[:2] == b[:2] and abs(a[2] - b[2]) <= 1e-4 * abs(a[2]), (a, b)
    if dropout:  # masks are drawn over the memory layout: one row draws other (equally random) masks than rows
        return
    we, wf = _adapter(eager.run_dir), _adapter(fast.run_dir)
    for k in we:
        assert torch.allclose(we[k], wf[k], atol=1e-5, rtol=1e-3), k


@pytest.mark.parametrize("pipe", [False, True], ids=["sync", "pipelined"])
def test_bucketed_step_clips_like_clip_grad_norm(tmp_path, tiny_model_dir, monkeypatch, pipe):
    """Clipping on the flat buffer (divided in place, or by the fused AdamW's grad_scale when pipelined)
    equals clip_grad_norm_ on the eager step; max_grad_norm far below every step's norm, so every step clips."""
    monkeypatch.setattr(loop, "PIPELINE", pipe)
    kw = dict(lora_dropout=0.0, max_grad_norm=1e-3, val_data={})
    eager = loop.train(_cfg(tmp_path, tiny_model_dir, "eager", cuda_graph=False, **kw), progress=False)
    fast = loop.train(_cfg(tmp_path, tiny_model_dir, "fast", cuda_graph=True, **kw), progress=False)
    free = loop.train(_cfg(tmp_path, tiny_model_dir, "free", cuda_graph=True, **{**kw, "max_grad_norm": 0.0}),
                      progress=False)
    le, lf = _log(eager.run_dir), _log(fast.run_dir)
    train = lambda L: [r for r in L if r["type"] == "train"]  # noqa: E731
    assert all(r["grad_norm"] > 100 * 1e-3 for r in train(le))
    for a, b in zip(train(le), train(lf), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a, b)
    we, wf, wn = _adapter(eager.run_dir), _adapter(fast.run_dir), _adapter(free.run_dir)
    for k in we:
        assert torch.allclose(we[k], wf[k], atol=1e-6, rtol=1e-4), k
    assert any(not torch.allclose(wf[k], wn[k], atol=1e-6, rtol=1e-4) for k in wf)  # clipping did something


def test_bucketed_step_skips_a_nonfinite_step(tmp_path, tiny_model_dir, monkeypatch, pipelined):
    from lorafit.training import graphstep

    real = graphstep.BucketedStep._forward_backward
    calls = {"n": 0}

    def nan_on_third(self, batch):
        calls["n"] += 1
        loss = self.loss_fn(self.model, batch, num_items_in_batch=self.one)
        if calls["n"] == 3:
            loss = loss * float("nan")
        (loss * self.scale).backward()
        return loss.detach()

    monkeypatch.setattr(graphstep.BucketedStep, "_forward_backward", nan_on_third)
    res = loop.train(_cfg(tmp_path, tiny_model_dir, "nan", cuda_graph=True, val_data={}), progress=False)
    monkeypatch.setattr(graphstep.BucketedStep, "_forward_backward", real)
    log = _log(res.run_dir)
    assert [r["step"] for r in log if r.get("event") == "nonfinite_skip"] == [2]  # micro-batch 3 is step 2's
    assert all(torch.isfinite(t).all() for t in _adapter(res.run_dir).values())


@pytest.mark.parametrize("quantize_base", ["none", "fp8"])
def test_killed_bucketed_run_resumes_bit_identically(tmp_path, tiny_model_dir, monkeypatch, quantize_base):
    """Pipelined (the GPU default): the unpipelined loop's resume is covered by test_train and test_resume_kill.
    With FP8 frozen GEMMs the resumed run makes the same copies again: still bit-identical."""
    monkeypatch.setattr(loop, "PIPELINE", True)
    from lorafit.training import graphstep

    cfg = partial(_cfg, quantize_base=quantize_base)
    ref = loop.train(cfg(tmp_path, tiny_model_dir, "ref", cuda_graph=True), progress=False)
    real = graphstep.BucketedStep.__call__
    calls = {"n": 0}

    def dying(self, examples, scale):
        calls["n"] += 1
        if calls["n"] == 9:  # in step 5, after the step-4 checkpoint
            raise KeyboardInterrupt
        return real(self, examples, scale)

    monkeypatch.setattr(graphstep.BucketedStep, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg(tmp_path, tiny_model_dir, "cut", cuda_graph=True), progress=False)
    monkeypatch.setattr(graphstep.BucketedStep, "__call__", real)
    res = loop.train(cfg(tmp_path, tiny_model_dir, "cut", cuda_graph=True), progress=False)
    assert res.resumed_from == 4
    a, b = _adapter(ref.run_dir), _adapter(res.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda L: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in L if r.get("event") != "resume"]
    assert drop(_log(ref.run_dir)) == drop(_log(res.run_dir))


def test_packed_runs_take_the_bucketed_step_and_train_like_the_eager_packed_step(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(loop, "PIPELINE", True)
    kw = dict(packing=True, pack_tokens=256, lora_dropout=0.0)  # CPU dropout draws torch masks of the row's shape
    eager = loop.train(_cfg(tmp_path, tiny_model_dir, "eager", cuda_graph=False, **kw), progress=False)
    fast = loop.train(_cfg(tmp_path, tiny_model_dir, "fast", cuda_graph=True, **kw), progress=False)
    le, lf = _log(eager.run_dir), _log(fast.run_dir)
    assert lf[0]["step_kind"] == "bucketed" and "packing" not in lf[0]["step_fallback"] and lf[0]["packing"]
    pick = lambda L: [(r["type"], r["step"], r.get("loss", r.get("eval_loss"))) for r in L if r["type"] in ("train", "eval")]
    for a, b in zip(pick(le), pick(lf), strict=True):
        assert a[:2] == b[:2] and abs(a[2] - b[2]) <= 1e-4 * abs(a[2]), (a, b)
    we, wf = _adapter(eager.run_dir), _adapter(fast.run_dir)
    for k in we:
        assert torch.allclose(we[k], wf[k], atol=1e-5, rtol=1e-3), k


def test_flat_evaluation_loss_equals_the_padded_one(tmp_path, tiny_model_dir):
    from lorafit import data as D
    from lorafit.kernels import accelerate_model
    from lorafit.model import apply_lora, load_model, load_tokenizer
    from lorafit.training.step import evaluate_loss

    cfg = _cfg(tmp_path, tiny_model_dir, "x")
    tok = D.ensure_template(load_tokenizer(cfg.model), cfg.template)
    enc = D.encode_all(tok, D.build_datasets(cfg).val["faq"], cfg)
    model = accelerate_model(apply_lora(load_model(cfg.model, device="cpu", dtype="float32"), cfg))
    with torch.no_grad():  # a non-zero adapter, so the LoRA path counts
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    dev = torch.device("cpu")
    padded = evaluate_loss(model, enc, 4, tok.pad_token_id, dev)
    flat = evaluate_loss(model, enc, 4, tok.pad_token_id, dev, flat=True)
    assert abs(padded - flat) <= 1e-4 * padded and model.training


def test_disk_full_during_training_is_one_line_and_resumable(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """ENOSPC in a checkpoint write: exit 2 naming the path, the lock released; the same command resumes."""
    import errno
    import os

    from lorafit.cli import main
    from lorafit.training import checkpoint as C

    cfg = _cfg(tmp_path, tiny_model_dir, "full", val_data={})
    real = C.save_checkpoint
    calls = {"n": 0}

    def full_disk(root, step, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / f"step-{step}"))
        return real(root, step, **kw)

    monkeypatch.setattr(C, "save_checkpoint", full_disk)
    import yaml

    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if v is not None and k not in
                                    ("effective_warmup_steps", "total_steps", "global_batch_size", "world_size")}))
    assert main(["train", str(path), "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lorafit: error")]
    assert len(err) == 1 and "disk full while writing" in err[0] and "step-4" in err[0]
    assert not (tmp_path / "full" / ".lock").exists() and not (tmp_path / "full" / "adapter").exists()
    monkeypatch.setattr(C, "save_checkpoint", real)
    assert main(["train", str(path), "--no-progress"]) == 0
    assert any('"resume"' in ln for ln in (tmp_path / "full" / "log.jsonl").read_text().splitlines())

