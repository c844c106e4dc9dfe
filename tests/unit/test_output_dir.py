"""The output-folder and resume rules (lorafit.rundir, docs/reliability.md): lorafit writes only into a
new/empty folder or its own run, never over one of its inputs, and resumes only with the same config.

Unit tests call the rundir functions; the CLI tests run `lorafit.cli.main(["train", ...])` in-process
on a tiny random Llama and check the exit status, the one error line, and that every byte of the
user's files is unchanged.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from lorafit.cli import main
from lorafit.config import FIELDS, load_config
from lorafit.errors import ConfigError
from lorafit.rundir import MARKER, RESUMABLE_KEYS, check_resume, guard_output_dir, is_run_dir, mark_run_dir

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
GOOD = BAD / "good.json"


def cfg(out: Path, **kw) -> object:
    return load_config(None, {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "data": [str(GOOD)],
                              "output_dir": str(out), **kw})


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` -> sha256 of its bytes ('dir' for folders)."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def user_folder(d: Path) -> Path:
    """A folder of the user's own files that look like a run's (the issue's case)."""
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "notes.txt").write_text("my adapter notes\n")
    (d / "checkpoints" / "step-1").mkdir(parents=True)
    (d / "checkpoints" / "step-1" / "w.bin").write_bytes(bytes(range(256)))
    (d / "log.jsonl").write_text('{"my": "log"}\n')
    return d


def old_run(d: Path) -> Path:
    """A run folder written before the marker existed: lorafit's config.yaml and start event."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg(d).to_dict()))
    (d / "log.jsonl").write_text(json.dumps({"type": "event", "step": 0, "event": "start", "total_steps": 1}) + "\n")
    return d


# --- is_run_dir / mark_run_dir -------------------------------------------------------------------
def test_marker_makes_a_run_dir_and_is_idempotent(tmp_path):
    out = tmp_path / "a" / "b"
    assert not is_run_dir(out)
    mark_run_dir(out)
    first = (out / MARKER).read_bytes()
    mark_run_dir(out)
    assert is_run_dir(out) and (out / MARKER).read_bytes() == first
    assert [p.name for p in out.iterdir()] == [MARKER]  # no temporary file left


def test_old_runs_without_marker_are_recognised(tmp_path):
    assert is_run_dir(old_run(tmp_path / "run"))


@pytest.mark.parametrize("breakage", ["user_log", "no_log", "not_lorafit_config", "binary_config"])
def test_look_alikes_are_not_run_dirs(tmp_path, breakage):
    d = old_run(tmp_path / "run")
    if breakage == "user_log":
        (d / "log.jsonl").write_text('{"type": "event", "event": "my own"}\n')
    elif breakage == "no_log":
        (d / "log.jsonl").unlink()
    elif breakage == "not_lorafit_config":
        (d / "config.yaml").write_text("model: x\ndata: y\noutput_dir: .\nmy_key: 1\n")
    else:
        (d / "config.yaml").write_bytes(b"\xff\xfe\x00garbage")
    assert not is_run_dir(d)


# --- guard_output_dir ----------------------------------------------------------------------------
def test_new_empty_and_run_folders_are_allowed(tmp_path):
    guard_output_dir(cfg(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    guard_output_dir(cfg(tmp_path / "empty"))
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / ".lock").touch()  # what a kill right after creating the folder leaves
    guard_output_dir(cfg(tmp_path / "killed"))
    mark_run_dir(tmp_path / "run")
    (tmp_path / "run" / "log.jsonl").write_text("")
    guard_output_dir(cfg(tmp_path / "run"))
    guard_output_dir(cfg(old_run(tmp_path / "old")))
    assert not (tmp_path / "new").exists()  # nothing written


def test_folder_of_user_files_is_refused_and_untouched(tmp_path):
    d = user_folder(tmp_path / "mine")
    before = snapshot(d)
    with pytest.raises(ConfigError, match=r"not empty \(adapter, checkpoints, log.jsonl\) and is not a lorafit run") as e:
        guard_output_dir(cfg(d))
    assert e.value.field == "output_dir" and e.value.file == str(d)
    assert snapshot(d) == before


@pytest.mark.parametrize("key", ["data", "val_data", "general_eval", "general_data", "model", "config"])
def test_an_input_inside_the_output_folder_is_refused(tmp_path, key):
    out = tmp_path / "p"
    mark_run_dir(out)  # even in a real run folder
    inside = out / "sub" / "file.json"
    inside.parent.mkdir()
    inside.write_text(GOOD.read_text())
    kw = {"data": {"data": [str(inside)]}, "val_data": {"val_data": {"dev": str(inside)}},
          "general_eval": {"general_eval": str(inside)}, "general_data": {"general_data": [str(inside)]},
          "model": {"model": str(out / "sub")}, "config": {}}[key]
    with pytest.raises(ConfigError, match=r"holds the run's input") as e:
        guard_output_dir(cfg(out, **kw), config_path=inside if key == "config" else None)
    assert e.value.field == "output_dir"


def test_output_folder_that_is_an_input_and_dataset_info_fragment(tmp_path):
    info = tmp_path / "ds" / "dataset_info.json"
    info.parent.mkdir()
    info.write_text("{}")
    with pytest.raises(ConfigError, match=r"holds the run's input data"):
        guard_output_dir(cfg(tmp_path / "ds", data=[f"{info}#alpaca"]))
    with pytest.raises(ConfigError, match=r"is the run's input model"):
        guard_output_dir(cfg(tmp_path / "ds", model=str(tmp_path / "ds")))
    guard_output_dir(cfg(tmp_path / "elsewhere", data=[f"{info}#alpaca"]))  # outside: fine


# --- check_resume --------------------------------------------------------------------------------
def saved_run(tmp_path: Path, **kw) -> Path:
    out = tmp_path / "run"
    mark_run_dir(out)
    c = cfg(out, **kw)
    c.total_steps, c.effective_warmup_steps = 10, 2
    (out / "config.yaml").write_text(yaml.safe_dump(c.to_dict(), sort_keys=False))
    return out


def test_resume_with_the_same_config_or_resumable_changes(tmp_path):
    out = saved_run(tmp_path)
    check_resume(cfg(out), out)
    check_resume(cfg(out, max_steps=50, eval_steps=3, save_total_limit=5, logging_steps=1, device="cpu",
                     report_to=["tensorboard"], dist_timeout=60.0, forgetting_budget=0.1), out)
    check_resume(cfg(out), tmp_path / "not-a-run-yet")  # nothing saved: nothing to compare


@pytest.mark.parametrize("override,diff", [
    ({"lora_rank": 8}, "lora_rank: 16 -> 8"),
    ({"learning_rate": 5e-2}, "learning_rate: 0.0001 -> 0.05"),
    ({"seed": 1, "batch_size": 4}, "batch_size: 2 -> 4; seed: 42 -> 1"),
    ({"data": [str(BAD / "dataset_info" / "alpaca.json")]}, "data: ["),
])
def test_resume_with_a_different_config_lists_the_diff(tmp_path, override, diff):
    out = saved_run(tmp_path)
    with pytest.raises(ConfigError) as e:
        check_resume(cfg(out, **override), out)
    assert diff in e.value.message and e.value.file == str(out / "config.yaml")
    assert "max_steps" in e.value.message  # names what may change


def test_key_added_by_a_newer_version_counts_as_its_default(tmp_path):
    out = saved_run(tmp_path)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["l2_penalty"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resume(cfg(out), out)
    with pytest.raises(ConfigError, match=r"l2_penalty: 0.0 -> 0.5"):
        check_resume(cfg(out, l2_penalty=0.5), out)


def test_a_run_saved_before_balance_steps_resumes_only_with_its_data_order(tmp_path):
    """Runs saved before the key kept the shuffle's examples in each step (balance_steps 0): resuming with the
    default 8 would deal the rest of the epoch differently, so it is refused where dealing would happen."""
    out = saved_run(tmp_path, gradient_accumulation_steps=2)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["balance_steps"]
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "global_batch_size": 4}))
    with pytest.raises(ConfigError, match=r"balance_steps: 0 -> 8"):
        check_resume(cfg(out, gradient_accumulation_steps=2), out)
    check_resume(cfg(out, gradient_accumulation_steps=2, balance_steps=0), out)
    one = saved_run(tmp_path / "one")  # one micro-batch a step: nothing is dealt, nothing to refuse
    saved = yaml.safe_load((one / "config.yaml").read_text())
    del saved["balance_steps"]
    (one / "config.yaml").write_text(yaml.safe_dump({**saved, "global_batch_size": 2}))
    check_resume(cfg(one), one)


def test_accumulation_may_change_only_with_the_global_batch_kept(tmp_path, monkeypatch):
    out = saved_run(tmp_path, gradient_accumulation_steps=4)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "global_batch_size": 8, "world_size": 1}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_resume(cfg(out, gradient_accumulation_steps=2), out)  # 2 x 2 x 2 processes = 8
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: 4 -> 2"):
        check_resume(cfg(out, gradient_accumulation_steps=2), out)


def test_unreadable_saved_config_is_an_error(tmp_path):
    out = saved_run(tmp_path)
    (out / "config.yaml").write_text("a: 1\na: 2\n")
    with pytest.raises(ConfigError, match="the run's config is invalid .*duplicate key"):
        check_resume(cfg(out), out)


def test_resumable_keys_are_config_keys_and_exclude_what_defines_the_run():
    assert RESUMABLE_KEYS <= set(FIELDS)
    assert not RESUMABLE_KEYS & {"learning_rate", "lora_rank", "lora_alpha", "data", "model", "batch_size",
                                 "seed", "max_length", "lr_scheduler", "num_epochs", "template", "val_data"}


# --- through the CLI (needs training/loop.py to call rundir) ------------------------------------
def _train(capsys, config: Path, *extra: str) -> tuple[int, str]:
    rc = main(["train", str(config), "--no-progress", *extra])
    return rc, capsys.readouterr().err


def _one_error(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("lorafit: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def tiny_cfg(tiny_model_dir, tmp_path):
    """A valid config file on the tiny model; 2 steps."""
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump({"model": tiny_model_dir, "data": str(GOOD), "max_steps": 2, "max_length": 64,
                                 "eval_steps": 1, "save_steps": 1, "logging_steps": 1, "lora_rank": 4,
                                 "lora_alpha": 8, "learning_rate": 1e-3}))
    return p


def test_cli_folder_of_user_files_stays_byte_identical(capsys, tiny_cfg, tmp_path):
    d = user_folder(tmp_path / "d")
    before = snapshot(d)
    msg = _one_error(*_train(capsys, tiny_cfg, f"--output_dir={d}"))
    assert "not a lorafit run folder" in msg and "field 'output_dir'" in msg
    assert snapshot(d) == before


def test_cli_data_inside_output_dir(capsys, tiny_cfg, tmp_path):
    p = tmp_path / "p"
    p.mkdir()
    (p / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in json.loads(GOOD.read_text())))
    before = snapshot(p)
    msg = _one_error(*_train(capsys, tiny_cfg, f"--data={p / 'log.jsonl'}", f"--output_dir={p}"))
    assert "holds the run's input data" in msg
    assert snapshot(p) == before


def test_cli_config_inside_output_dir(capsys, tiny_model_dir, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    text = f"# my comments\nmodel: {tiny_model_dir}\ndata: {GOOD}\nmax_steps: 1\noutput_dir: .\n"
    (proj / "config.yaml").write_text(text)
    msg = _one_error(*_train(capsys, proj / "config.yaml"))
    assert "holds the run's input config" in msg
    assert (proj / "config.yaml").read_text() == text and [p.name for p in proj.iterdir()] == ["config.yaml"]


@pytest.mark.parametrize("override,diff", [("--lora_rank=8", "lora_rank: 4 -> 8"),
                                           ("--learning_rate=5e-2", "learning_rate: 0.001 -> 0.05")])
def test_cli_resume_with_another_config(capsys, tiny_cfg, tmp_path, override, diff):
    out = tmp_path / "run"
    rc, err = _train(capsys, tiny_cfg, f"--output_dir={out}", "--max_steps=1")
    assert rc == 0, err
    saved = (out / "config.yaml").read_bytes()
    msg = _one_error(*_train(capsys, tiny_cfg, f"--output_dir={out}", override))
    assert diff in msg
    assert (out / "config.yaml").read_bytes() == saved
    assert not (out / ".lock").exists()
    rc, err = _train(capsys, tiny_cfg, f"--output_dir={out}", "--max_steps=2")  # a resumable key: fine
    assert rc == 0, err


def test_cli_finished_run_with_corrupted_data(capsys, tiny_cfg, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(GOOD.read_text())
    out = tmp_path / "run"
    rc, err = _train(capsys, tiny_cfg, f"--data={data}", f"--output_dir={out}")
    assert rc == 0, err
    data.write_text(GOOD.read_text()[:-20])  # truncated
    msg = _one_error(*_train(capsys, tiny_cfg, f"--data={data}", f"--output_dir={out}"))
    assert str(data) in msg and "invalid JSON" in msg


# --- checkpoint rotation deletes only what lorafit wrote ----------------------------------------
def test_checkpoint_pruning_keeps_folders_lorafit_did_not_write(tmp_path):
    import torch

    from lorafit.training.checkpoint import list_checkpoints, save_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step-0").mkdir(parents=True)  # a folder with a checkpoint's name, but no manifest
    (root / "step-0" / "mine.bin").write_bytes(b"user bytes")
    (root / ".tmp-step-notes").mkdir()     # a name like a temporary folder's, but not one
    (root / ".tmp-step-3-123").mkdir()     # a real leftover of a killed write: removed
    for step in (1, 2, 3, 4):
        save_checkpoint(root, step, weights={"w": torch.ones(2)}, optim_state={"state": {}, "param_groups": []},
                        state={"step": step}, keep=2)
    assert [c.name for c in list_checkpoints(root)] == ["step-0", "step-3", "step-4"]
    assert (root / "step-0" / "mine.bin").read_bytes() == b"user bytes"
    assert (root / ".tmp-step-notes").is_dir() and not (root / ".tmp-step-3-123").exists()
