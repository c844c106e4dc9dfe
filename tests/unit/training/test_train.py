"""End-to-end training on a tiny random Llama (SmolLM2's config family and real tokenizer)."""
import json

import pytest
import torch

from lorafit.config import load_config
from lorafit.demoset import write_demo_data


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"))


def cfg_for(tiny_model_dir, demo_data, out, **kw):
    train, val = demo_data
    base = {"model": tiny_model_dir, "data": [str(train)], "val_data": {"support": str(val)}, "output_dir": str(out),
            "max_steps": 8, "max_length": 96, "eval_steps": 4, "logging_steps": 2, "save_steps": 4,
            "learning_rate": 1e-3, "lora_dropout": 0.0}
    base.update(kw)
    return load_config(None, base)


def records(run):
    return [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, demo_data, tmp_path_factory):
    import lorafit

    out = tmp_path_factory.mktemp("runs") / "run"
    lorafit.train(cfg_for(tiny_model_dir, demo_data, out, lora_dropout=0.1), progress=False)
    return out


def test_run_folder_contract(trained):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml", "log.jsonl", "loss.png"):
        assert (trained / name).is_file(), name
    recs = records(trained)
    train_recs = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 8]
    for r in train_recs:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) and r["tokens_per_s"] > 0
    evals = [r for r in recs if r["type"] == "eval"]
    assert [(r["step"], r["split"]) for r in evals] == [(0, "support"), (4, "support"), (8, "support")]
    start = recs[0]
    assert start["event"] == "start" and start["effective_warmup_steps"] == 8  # max(20, 0.8) capped at 8 steps
    assert "effective_warmup_steps: 8" in (trained / "config.yaml").read_text()
    assert recs[-1]["event"] == "end"


def test_adapter_loads_with_peft_and_changes_outputs(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 400, 500, 600, 700]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(trained / "adapter"))
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-4


def test_merge_matches_base_plus_adapter(trained, tmp_path):
    import lorafit
    from lorafit.model import load_run_model
    from transformers import AutoModelForCausalLM

    out = lorafit.merge(trained, tmp_path / "merged")
    assert list(out.glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    model, _ = load_run_model(trained, device="cpu")
    ids = torch.tensor([[1, 10, 200, 3000, 40000, 5]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-4)


def test_generate_cli(trained, capsys):
    from lorafit.cli import main

    # A random tiny model may answer with special tokens only (printed as an empty line); the
    # real-model integration test checks the text itself.
    assert main(["generate", "--run", str(trained), "How do I return a bike?", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_seeded_runs_are_identical_and_accumulation_is_exact(tiny_model_dir, demo_data, tmp_path):
    from lorafit.training import train
    from safetensors.torch import load_file

    a = train(cfg_for(tiny_model_dir, demo_data, tmp_path / "a", max_steps=3), progress=False).run_dir
    b = train(cfg_for(tiny_model_dir, demo_data, tmp_path / "b", max_steps=3), progress=False).run_dir
    # (one example a micro-batch: balance_steps deals nothing, each step keeps the shuffle's examples)
    c = train(cfg_for(tiny_model_dir, demo_data, tmp_path / "c", max_steps=3, batch_size=1,
                      gradient_accumulation_steps=2), progress=False).run_dir
    wa, wb, wc = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # batch 2 x accumulation 1 == batch 1 x accumulation 2: loss is normalised by the window's tokens
    assert all(torch.allclose(wa[k], wc[k], atol=1e-5) for k in wa)


def test_balance_steps_changes_which_examples_share_a_step_not_what_an_epoch_sees(tiny_model_dir, demo_data, tmp_path,
                                                                                   monkeypatch):
    from lorafit.data.batches import Stream
    from lorafit.training import train
    from safetensors.torch import load_file

    seen: dict[int, list] = {}
    real = Stream.step_groups

    def spy(self, step, per_step, window_steps=0, total=None):
        groups = real(self, step, per_step, window_steps, total)
        seen.setdefault(window_steps, []).append(sorted(i for g in groups for i in g))
        return groups

    monkeypatch.setattr(Stream, "step_groups", spy)
    runs = {w: train(cfg_for(tiny_model_dir, demo_data, tmp_path / f"w{w}", max_steps=-1, num_epochs=1, batch_size=2,
                             gradient_accumulation_steps=2, balance_steps=w, val_data={}), progress=False).run_dir
            for w in (0, 4)}
    assert sorted(i for s in seen[0] for i in s) == sorted(i for s in seen[4] for i in s)  # each example once
    assert seen[0] != seen[4]
    w0, w4 = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in runs.values())
    assert any(not torch.allclose(w0[k], w4[k]) for k in w0)


def test_l2_penalty_and_weight_decay_are_different_things(tiny_model_dir, demo_data, tmp_path):
    from lorafit.training import train
    from safetensors.torch import load_file

    def norm(run):
        w = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        return sum(float((t ** 2).sum()) for k, t in w.items() if "lora_B" in k)

    plain = norm(train(cfg_for(tiny_model_dir, demo_data, tmp_path / "p", max_steps=4), progress=False).run_dir)
    l2 = norm(train(cfg_for(tiny_model_dir, demo_data, tmp_path / "l2", max_steps=4, l2_penalty=10.0), progress=False).run_dir)
    wd = norm(train(cfg_for(tiny_model_dir, demo_data, tmp_path / "wd", max_steps=4, weight_decay=50.0), progress=False).run_dir)
    assert l2 < plain and wd < plain and abs(l2 - wd) > 1e-9


def test_early_stopping_restores_best(tiny_model_dir, demo_data, tmp_path):
    from lorafit.training import train

    # A huge LR makes validation loss worse after the first evaluation -> stop and keep the best adapter.
    res = train(cfg_for(tiny_model_dir, demo_data, tmp_path / "es", max_steps=40, eval_steps=2, learning_rate=0.05,
                        early_stopping_patience=2), progress=False)
    recs = records(res.run_dir)
    ev = [r for r in recs if r["type"] == "event" and r["event"] == "early_stop"]
    assert res.stopped_early and ev and ev[0]["step"] < 40
    assert (res.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_general_mixing_logged(tiny_model_dir, demo_data, tmp_path):
    from lorafit.training import train

    train_file, _ = demo_data
    res = train(cfg_for(tiny_model_dir, demo_data, tmp_path / "mix", max_steps=1, general_data=[str(train_file)],
                        general_ratio=0.2, general_eval=str(demo_data[1])), progress=False)
    start = records(res.run_dir)[0]
    assert start["general_examples"] == round(start["train_examples"] * 0.2)
    assert any(r.get("split") == "general" for r in records(res.run_dir))


def test_second_trainer_on_the_same_folder_is_refused(tiny_model_dir, demo_data, tmp_path):
    from lorafit.errors import ConfigError
    from lorafit.training import train
    from lorafit.rundir import lock_output_dir

    out = tmp_path / "busy"
    held = lock_output_dir(out)  # another process's lock, as far as flock is concerned (separate open)
    try:
        with pytest.raises(ConfigError, match="in use"):
            train(cfg_for(tiny_model_dir, demo_data, out, max_steps=1), progress=False)
    finally:
        held.close()
    train(cfg_for(tiny_model_dir, demo_data, out, max_steps=1), progress=False)  # free again
    assert (out / "adapter").is_dir()


@pytest.mark.parametrize("fused", [False, True])
def test_a_pack_trains_on_exactly_its_examples(tiny_model_dir, demo_data, fused):
    """The summed loss of one packed row equals the sum over its examples trained alone: no example
    attends to, or is trained to predict, another (HF's packed-sequence mask, or lorafit's varlen path)."""
    from lorafit import data as D
    from lorafit.model import apply_lora, load_model, load_tokenizer
    from lorafit.data.batches import PackedStream
    from lorafit.training.loop import FusedLoss, loss_sum

    cfg = cfg_for(tiny_model_dir, demo_data, "unused", lora_dropout=0.0, packing=True, batch_size=2, max_length=256)
    tok = D.ensure_template(load_tokenizer(cfg.model), cfg.template)
    enc = D.encode_all(tok, D.build_datasets(cfg).train, cfg)
    stream = PackedStream(enc, cfg.batch_size, cfg.batch_size * cfg.max_length, cfg.seed, tok.pad_token_id)
    assert stream.per_epoch < -(-len(enc.input_ids) // cfg.batch_size)  # fewer steps than padded batches
    assert sorted(i for pack in stream.packs for i in pack) == list(range(len(enc.input_ids)))
    assert all(sum(len(enc.input_ids[i]) for i in p) <= cfg.batch_size * cfg.max_length or len(p) == 1
               for p in stream.packs)
    small = PackedStream(enc, cfg.batch_size, 200, cfg.seed, tok.pad_token_id)  # pack_tokens: 200
    assert small.per_epoch > stream.per_epoch
    assert all(sum(len(enc.input_ids[i]) for i in p) <= 200 or len(p) == 1 for p in small.packs)
    model = apply_lora(load_model(cfg.model, device="cpu", dtype="float32"), cfg)
    for name, prm in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(prm, std=0.1)  # a non-trivial adapter
    if fused:
        from lorafit.kernels import accelerate_model

        model = FusedLoss(accelerate_model(model))
    model.eval()
    dev = torch.device("cpu")
    k = max(range(stream.per_epoch), key=lambda j: len(stream.indices(j)))
    idx = stream.indices(k)
    assert len(idx) > 1
    with torch.no_grad():
        packed, n_packed = loss_sum(model, stream.batch(k), dev, fused)
        alone = [loss_sum(model, D.collate([enc.input_ids[i]], [enc.labels[i]], tok.pad_token_id), dev, fused)
                 for i in idx]
    assert n_packed == sum(n for _, n in alone) == stream.n_supervised(k)
    assert abs(packed.item() - sum(l.item() for l, _ in alone)) < 1e-3 * abs(packed.item())


def test_packed_training_runs_and_resumes_identically(tiny_model_dir, demo_data, tmp_path, kill_training_at):
    import lorafit
    from safetensors.torch import load_file

    ref = tmp_path / "ref"
    lorafit.train(cfg_for(tiny_model_dir, demo_data, ref, packing=True, lora_dropout=0.1, max_steps=6,
                          save_steps=2, eval_steps=6, max_length=256), progress=False)
    start = next(r for r in records(ref) if r.get("event") == "start")
    plain_steps = -(-start["train_examples"] // 2)
    assert start["packing"] and start["micro_batches_per_epoch"] < plain_steps
    losses = [r["loss"] for r in records(ref) if r["type"] == "train"]
    assert losses[-1] < losses[0]
    run = tmp_path / "run"
    kill_training_at(4)
    with pytest.raises(KeyboardInterrupt):
        lorafit.train(cfg_for(tiny_model_dir, demo_data, run, packing=True, lora_dropout=0.1, max_steps=6,
                              save_steps=2, eval_steps=6, max_length=256), progress=False)
    kill_training_at(None)
    lorafit.train(cfg_for(tiny_model_dir, demo_data, run, packing=True, lora_dropout=0.1, max_steps=6,
                          save_steps=2, eval_steps=6, max_length=256), progress=False)
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seeded_dropout_size_limit_is_a_config_error():
    """fused_kernels' seeded dropout hashes 32-bit offsets: an oversized micro-batch is refused with the
    field to change, before the run folder is touched (the check runs before the output lock)."""
    from types import SimpleNamespace

    from lorafit.errors import ConfigError
    from lorafit.training.loop import _check_seeded_dropout_size

    llama8b = SimpleNamespace(hidden_size=4096, intermediate_size=14336)
    ok = load_config(None, {"model": "m", "data": ["d.json"], "batch_size": 2, "max_length": 1024})
    _check_seeded_dropout_size(ok, llama8b)
    big = load_config(None, {"model": "m", "data": ["d.json"], "packing": True, "pack_tokens": 200_000})
    with pytest.raises(ConfigError) as e:
        _check_seeded_dropout_size(big, llama8b)
    assert e.value.field == "pack_tokens" and "2^31" in str(e.value)
    wide = load_config(None, {"model": "m", "data": ["d.json"], "batch_size": 160, "max_length": 1024})
    with pytest.raises(ConfigError) as e:
        _check_seeded_dropout_size(wide, llama8b)
    assert e.value.field == "batch_size"


def test_docs_run_folder_lists_every_record_field_the_trainer_writes(trained):
    """docs/run-folder.md cannot drift from what `lorafit train` writes: every record type, event name and
    field of a real run's log.jsonl, and every top-level entry of its run folder, is named in the doc."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "run-folder.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([^`]+)`", doc)) | set(re.findall(r'"(\w+)"', doc))
    named |= {w.strip("`/") for w in named} | {w.split("/")[0] for w in named}
    missing = set()
    for r in records(trained):
        missing |= {f"{r['type']} record field '{k}'" for k in r if k not in named}
        if r["type"] == "event" and r["event"] not in named:
            missing.add(f"event '{r['event']}'")
    missing |= {f"run-folder entry '{p.name}'" for p in trained.iterdir() if p.name.strip("/") not in named}
    assert not missing, sorted(missing)


def test_no_progress_means_no_bar_at_all(tiny_model_dir, demo_data, tmp_path):
    """--no-progress for logs and CI: not lorafit's bar, and not transformers' 'Loading weights' bar either."""
    import subprocess
    import sys

    train_file, _ = demo_data
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": tiny_model_dir, "data": [str(train_file)], "output_dir": str(tmp_path / "run"),
                               "max_steps": 1, "max_length": 64, "device": "cpu"}))
    cmd = [sys.executable, "-m", "lorafit", "train", str(cfg), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "\r" not in p.stderr and "it/s]" not in p.stderr and "Loading weights" not in p.stderr, p.stderr[-2000:]
