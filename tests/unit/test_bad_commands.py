"""The bad-input corpus for every command besides `train`'s data and config (tests/data/bad/models,
adapters, blind, runs): model files, adapters for generate/merge/eval, output paths, the blind test
service, diagnose and report. Each case: exit status 2, one `lorafit: error:` line naming the file
and field, nothing written, and -- for adapters -- no base model loaded (it would take minutes).

`CORPUS_USED` names the corpus files used here, for test_bad_inputs' every-file-has-a-case check.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorafit.cli import main
from tests.unit.test_bad_inputs import BAD, _check, _error_line

MODEL_CASES = [  # (corpus file under models/, message fragment) through `lorafit train --model=...`
    ("text.gguf", "not a GGUF file (it starts with b'This'"),
    ("empty.gguf", "GGUF file is empty"),
    ("truncated.gguf", "cannot load model"),
    ("config_only", "folder has config.json but no tokenizer"),
]
ADAPTER_CASES = [  # (adapter_config under adapters/, weights under adapters/, file reported, field, fragment)
    ("bad_config.json", "good.safetensors", "adapter/adapter_config.json", None, "invalid JSON"),
    ("rank_not_int.json", "good.safetensors", "adapter/adapter_config.json", "r", "must be a positive integer"),
    ("adapter_config.json", "truncated.safetensors", "adapter/adapter_model.safetensors", None,
     "damaged adapter weights"),
    ("adapter_config.json", "random.safetensors", "adapter/adapter_model.safetensors", None, "damaged adapter weights"),
    ("adapter_config.json", "empty.safetensors", "adapter/adapter_model.safetensors", None, "damaged adapter weights"),
    ("adapter_config.json", "nan.safetensors", "adapter", None,
     "adapter weight base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight is non-finite; refusing to "),
]
COMMANDS = {"generate": ["generate", "--run", "{run}", "hello"], "merge": ["merge", "--run", "{run}", "--out", "{out}"],
            "evaluate": ["eval", "{run}"]}
CORPUS_USED = ({c[0] for c in MODEL_CASES} | {c[0] for c in ADAPTER_CASES} | {c[1] for c in ADAPTER_CASES}
               | {"not_a_study.db", "empty_log", "binary_log"})


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _cli(capsys, *argv: str) -> str:
    rc = main([str(a) for a in argv])
    return _error_line(rc, capsys.readouterr().err)


# --- model files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,fragment", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_file(capsys, tmp_path, name, fragment):
    model = BAD / "models" / name
    msg = _cli(capsys, "train", BAD / "base.yaml", f"--model={model}", f"--output_dir={tmp_path / 'out'}", "--no-progress")
    _check(msg, str(model), None, "model", fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change,field,fragment", [
    ("no_weights", "model", "folder has config.json but no weights"),
    ("--target_modules=[q_proj, nonexistent_proj]", "target_modules", "no module of the model matches"),
    ("--lora_rank=64", "lora_rank", "larger than the model's hidden size 32"),
])
def test_model_checked_against_the_config(capsys, tmp_path, tiny_model_dir, change, field, fragment):
    model = tiny_model_dir
    extra = [] if change == "no_weights" else [change]
    if change == "no_weights":
        model = tmp_path / "model"
        shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    msg = _cli(capsys, "train", BAD / "base.yaml", f"--model={model}", f"--output_dir={tmp_path / 'out'}",
               "--no-progress", *extra)
    _check(msg, None, None, field, fragment)
    assert not (tmp_path / "out").exists()


# --- adapters, for generate / merge / eval -------------------------------------------------------
def make_run(tmp_path: Path, config: str = "adapter_config.json", weights: str = "good.safetensors") -> Path:
    """A run folder whose config names a hub model (never loaded here) and a corpus adapter."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: HuggingFaceTB/SmolLM2-135M-Instruct\ndata: {BAD / 'good.json'}\n")
    shutil.copy(BAD / "adapters" / config, run / "adapter" / "adapter_config.json")
    shutil.copy(BAD / "adapters" / weights, run / "adapter" / "adapter_model.safetensors")
    return run


@pytest.fixture
def no_base_model(monkeypatch):
    """The adapter must be checked before the base loads: loading it fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the base model was loaded before the adapter was checked")

    for where in ("lorafit.model.load_model", "lorafit.model.load_tokenizer"):
        monkeypatch.setattr(where, refuse)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("config,weights,file,field,fragment", ADAPTER_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in ADAPTER_CASES])
def test_bad_adapter(capsys, tmp_path, no_base_model, command, config, weights, file, field, fragment):
    run = make_run(tmp_path, config, weights)
    argv = [a.format(run=run, out=tmp_path / "merged") for a in COMMANDS[command]]
    msg = _cli(capsys, *argv)
    _check(msg, str(run / file), None, field, fragment + (command if "refusing to" in fragment else ""))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("argv,field,fragment", [
    (["generate", "--run", "{run}", "hi", "--max-new-tokens", "-1"], "--max-new-tokens", "got -1"),
    (["eval", "{run}", "--max-samples", "-1"], "--max-samples", "got -1"),
    (["eval", "{run}", "--max-new-tokens", "0"], "--max-new-tokens", "got 0"),
    (["merge", "--run", "{run}", "--out", "/proc/lorafit-merged"], "--out", "cannot be created"),
    (["merge", "--run", "{run}", "--out", str(BAD / "good.json" / "merged")], "--out", "cannot be created"),
    (["merge", "--run", "{run}", "--out", "{tmp}"], "--out", "exists and is not an empty folder"),
])
def test_bad_command_options(capsys, tmp_path, no_base_model, argv, field, fragment):
    run = make_run(tmp_path)
    msg = _cli(capsys, *[a.format(run=run, tmp=tmp_path) for a in argv])
    _check(msg, None, None, field, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_merge_disk_full_names_the_path_and_leaves_nothing(capsys, tmp_path, tiny_model_dir, monkeypatch):
    import torch
    from peft import get_peft_model

    from lorafit.config import load_config
    from lorafit.model import load_model, lora_config

    run = make_run(tmp_path)
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\ndata: {BAD / 'good.json'}\nlora_rank: 4\n")
    torch.manual_seed(0)
    peft = get_peft_model(load_model(tiny_model_dir, device="cpu", dtype="float32"),
                          lora_config(load_config(run / "config.yaml")))
    peft.save_pretrained(run / "adapter")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lorafit.model.os.replace", full)
    out = tmp_path / "deep" / "merged"
    msg = _cli(capsys, "merge", "--run", run, "--out", out)
    _check(msg, str(out), None, "--out", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no merged/, no temporary, no deep/


# --- score and blind -----------------------------------------------------------------------------
def preds(path: Path, n: int = 4, tag: str = "") -> Path:
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "predict": f"a{i}{tag}", "label": f"a{i}"}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.parametrize("name,fragment", [("deep_nesting.jsonl", "nested too deeply"),
                                           ("huge_number.jsonl", "Exceeds the limit (4300 digits)")])
def test_blind_create_bad_predictions(capsys, tmp_path, name, fragment):
    bad = BAD / "predictions" / name
    msg = _cli(capsys, "blind", "create", "--a", bad, "--b", preds(tmp_path / "b.jsonl"), "--raters", "2",
               "--out", tmp_path / "s.db")
    _check(msg, str(bad), 2, None, fragment)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("out", ["/proc/lorafit-study.db", str(BAD / "good.json" / "study.db")])
def test_blind_create_unwritable_out(capsys, tmp_path, out):
    msg = _cli(capsys, "blind", "create", "--a", preds(tmp_path / "a.jsonl"), "--b", preds(tmp_path / "b.jsonl"),
               "--raters", "2", "--out", out)
    _check(msg, out, None, "--out", "cannot be created")


def test_blind_create_disk_full(capsys, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lorafit.blind.study.os.replace", full)
    out = tmp_path / "s.db"
    msg = _cli(capsys, "blind", "create", "--a", preds(tmp_path / "a.jsonl"), "--b", preds(tmp_path / "b.jsonl"),
               "--raters", "2", "--out", out)
    _check(msg, str(out), None, "--out", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]


@pytest.fixture
def study(tmp_path):
    """A study of two files whose names hold mathtext ('$...$'), with two ratings."""
    from lorafit.blind import create_study
    from lorafit.blind import store

    a, b = preds(tmp_path / "base$x^2$.jsonl"), preds(tmp_path / "tuned$\\alpha$.jsonl", tag="!")
    info = create_study(a, b, raters=2, out=tmp_path / "study.db")
    s = store.load_study(info.db)
    conn = store.connect(info.db)
    for rid in s.raters:
        iid, slot = s.layout[rid][0]
        scores = {d: 4 for d in store.DIMENSIONS}
        store.upsert_rating(conn, rid, iid, store.to_model_space(slot, scores, scores, "1"), "")
    conn.close()
    return Path(info.db), info


def test_study_file_is_owner_only(study):
    db, _ = study
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_results_plot_with_mathtext_in_file_names(capsys, study, tmp_path):
    db, info = study
    png = tmp_path / "plot.png"
    assert main(["blind", "results", str(db), "--plot", str(png)]) == 0, capsys.readouterr().err
    assert png.read_bytes()[:4] == b"\x89PNG"
    from lorafit.blind import make_app

    r = TestClient(make_app(db)).get("/api/admin/results.png", headers={"Authorization": f"Bearer {info.admin_token}"})
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"


def test_results_plot_unwritable(capsys, study):
    db, _ = study
    out = str(BAD / "good.json" / "plot.png")
    _check(_cli(capsys, "blind", "results", db, "--plot", out), out, None, "--plot", "cannot write the plot")


def test_server_error_keeps_security_headers(study, monkeypatch):
    from lorafit.blind import make_app

    db, info = study
    client = TestClient(make_app(db), raise_server_exceptions=False)
    monkeypatch.setattr("lorafit.blind.stats.results", lambda *_: 1 / 0)
    r = client.get("/api/admin/results", headers={"Authorization": f"Bearer {info.admin_token}"})
    assert r.status_code == 500
    for k, v in {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}.items():
        assert r.headers.get(k) == v, (k, dict(r.headers))
    assert "ZeroDivision" not in r.text


def test_token_is_checked_before_the_body_limit(study):
    from lorafit.blind import make_app

    db, info = study
    client = TestClient(make_app(db))
    url = "/api/rater/items/x/rating"
    big = b"x" * (10 * 1024 * 1024)
    assert client.put(url, content=big).status_code == 401
    assert client.put(url, content=big, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.put(url, content=big, headers={"Authorization": f"Bearer {info.tokens[0]}"})
    assert r.status_code == 413 and r.headers.get("X-Frame-Options") == "DENY"


def test_blind_serve_bad_port(capsys, study):
    db, _ = study
    _check(_cli(capsys, "blind", "serve", db, "--port", "99999"), None, None, "--port", "from 1 to 65535, got 99999")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        _check(_cli(capsys, "blind", "serve", db, "--port", str(port)), None, None, "--port",
               f"cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("argv", [["blind", "results", "{db}"], ["blind", "serve", "{db}"],
                                  ["report", "{tmp}", "--study", "{db}"]], ids=["results", "serve", "report"])
def test_not_a_study_file(capsys, tmp_path, argv):
    db = BAD / "blind" / "not_a_study.db"
    before = db.read_bytes()
    msg = _cli(capsys, *[a.format(db=db, tmp=tmp_path) for a in argv])
    _check(msg, str(db), None, None, "not a lorafit blind study")
    assert db.read_bytes() == before and list(tmp_path.iterdir()) == []


# --- diagnose and report on damaged run folders ---------------------------------------------------
@pytest.mark.parametrize("command", ["diagnose", "report"])
@pytest.mark.parametrize("run", ["empty_log", "binary_log"])
def test_damaged_run_log(capsys, tmp_path, command, run):
    folder = tmp_path / run
    shutil.copytree(BAD / "runs" / run, folder)  # a copy: a command that wrongly succeeds writes into it
    before = sorted(p.name for p in folder.iterdir())
    msg = _cli(capsys, command, folder)
    _check(msg, str(folder / "log.jsonl"), 1 if run == "binary_log" else None, None, "")
    assert sorted(p.name for p in folder.iterdir()) == before
