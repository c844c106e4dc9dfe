"""`lorafit diagnose` / `report` on runs of other trainers: LLaMA-Factory's trainer_log.jsonl and
transformers' trainer_state.json, in the shapes their writers produce (LogCallback.on_log, TrainerState),
several versions; the same losses must give the same findings as lorafit's own log, no unreadable or
empty log may read as healthy, and the fixes come back in the tool's own keys."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorafit.cli import main
from lorafit.config import load_config, save_config
from lorafit.diagnosis import diagnose_records, diagnose_run, format_findings, load_source
from lorafit.diagnosis.synthetic import generate
from lorafit.errors import ConfigError, RunError

# Field names of LLaMA-Factory's argument dataclasses that --write-config may emit, read from its source
# (src/llamafactory/hparams/{finetuning,data,model}_args.py and transformers' Seq2SeqTrainingArguments).
LF_FIELDS = {
    "model_name_or_path", "stage", "do_train", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout",
    "lora_target", "dataset", "eval_dataset", "template", "cutoff_len", "max_samples", "val_size", "mix_strategy",
    "interleave_probs", "overwrite_cache", "preprocessing_num_workers", "output_dir", "logging_steps", "save_steps",
    "plot_loss", "overwrite_output_dir", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_steps", "max_grad_norm",
    "weight_decay", "bf16", "fp16", "eval_strategy", "eval_steps", "save_strategy", "per_device_eval_batch_size",
    "load_best_model_at_end", "metric_for_best_model", "early_stopping_steps", "neftune_noise_alpha", "report_to",
}


# --- the same run in three trainers' shapes -------------------------------------------------------
def _run(plant: set[str], seed: int = 0, grad: bool = False) -> list[dict]:
    """A synthetic run reduced to what every trainer logs: step, loss, lr, epoch (grad_norm if asked),
    the eval loss, and the run length."""
    syn = generate(np.random.default_rng(seed), plant, spike_steps=[200, 400, 1400, 2000] if "fluctuation" in plant else None)
    out: list[dict] = []
    for r in syn.records:
        if r["type"] == "event" and r.get("event") == "start":
            out.append({"type": "event", "step": 0, "event": "start", "total_steps": r["total_steps"]})
        elif r["type"] == "train":
            keep = ("step", "loss", "lr", "epoch") + (("grad_norm",) if grad else ())
            out.append({"type": "train", **{k: r[k] for k in keep if k in r}})
        elif r["type"] == "eval":
            out.append(r)
    return out


def _total(recs: list[dict]) -> int:
    return next(r["total_steps"] for r in recs if r["type"] == "event")


def lf_lines(recs: list[dict], old: bool = False, extras: bool = True) -> list[dict]:
    """trainer_log.jsonl as LogCallback writes it: train lines, eval lines, then the final summary line
    (`learning_rate` instead of `lr` before late 2024; throughput/total_tokens when tokens are counted)."""
    total, lines, tokens = _total(recs), [], 0
    for r in recs:
        base = {"current_steps": r["step"], "total_steps": total}
        if r["type"] == "train":
            tokens += 4096
            line = {**base, "loss": r["loss"], ("learning_rate" if old else "lr"): r["lr"], "epoch": r["epoch"]}
            if extras and not old:
                line.update(throughput=1234.5, total_tokens=tokens)
        elif r["type"] == "eval":
            line = {**base, "eval_loss": r["eval_loss"]}
        else:
            continue
        line.update(percentage=round(100 * r["step"] / total, 2), elapsed_time="0:01:00", remaining_time="0:10:00")
        lines.append(line)
    lines.append({"current_steps": total, "total_steps": total, "epoch": 1.0, "percentage": 100.0,
                  "elapsed_time": "1:00:00", "remaining_time": "0:00:00"})
    return lines


def hf_state(recs: list[dict], new: bool = True, split_names: dict[str, str] | None = None) -> dict:
    """trainer_state.json as TrainerState.save_to_json writes it (4.40+: logging_steps etc.; older: not)."""
    hist: list[dict] = []
    for r in recs:
        if r["type"] == "train":
            e = {"epoch": r["epoch"], "learning_rate": r["lr"], "loss": r["loss"], "step": r["step"]}
            if "grad_norm" in r:
                e["grad_norm"] = r["grad_norm"]
            hist.append(e)
        elif r["type"] == "eval":
            name = (split_names or {}).get(r["split"], "")
            key = f"eval_{name}_loss" if name else "eval_loss"
            hist.append({"epoch": 0.0, key: r["eval_loss"], f"eval_{name + '_' if name else ''}runtime": 1.2,
                         "eval_samples_per_second": 50.0, "eval_steps_per_second": 6.2, "step": r["step"]})
    total = _total(recs)
    hist.append({"epoch": 1.0, "step": total, "total_flos": 1.0e15, "train_loss": 1.7, "train_runtime": 3600.0,
                 "train_samples_per_second": 2.0, "train_steps_per_second": 1.0})
    state = {"best_metric": None, "best_model_checkpoint": None, "epoch": 1.0, "eval_steps": 200,
             "global_step": total, "is_hyper_param_search": False, "is_local_process_zero": True,
             "is_world_process_zero": True, "log_history": hist, "max_steps": total, "num_train_epochs": 1,
             "total_flos": 1.0e15, "trial_name": None, "trial_params": None}
    if new:
        steps = [r["step"] for r in recs if r["type"] == "train"]
        state.update(logging_steps=int(np.median(np.diff(steps))), save_steps=500, train_batch_size=2, num_input_tokens_seen=0,
                     best_global_step=None, stateful_callbacks={})
    return state


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def same(findings) -> list[tuple]:
    return [(f.kind, f.severity, f.steps, f.summary) for f in findings]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("plant", [{"fluctuation", "overfitting"}, {"divergence"}, {"plateau"}, set()])
def test_llamafactory_and_hf_runs_get_the_lorafit_findings(tmp_path, plant):
    recs = _run(plant, seed=3)
    ours = diagnose_run(write_jsonl(tmp_path / "lorafit" / "log.jsonl", recs).parent)
    assert (plant - {"plateau"}) <= {f.kind for f in ours if f.severity != "info"}
    shapes = {
        "lf-new": write_jsonl(tmp_path / "lf-new" / "trainer_log.jsonl", lf_lines(recs)).parent,
        "lf-old": write_jsonl(tmp_path / "lf-old" / "trainer_log.jsonl", lf_lines(recs, old=True)).parent,
        "hf-new": write_json(tmp_path / "hf-new" / "trainer_state.json", hf_state(recs)).parent,
        "hf-old": write_json(tmp_path / "hf-old" / "trainer_state.json", hf_state(recs, new=False)).parent,
        "lf-file": tmp_path / "lf-new" / "trainer_log.jsonl",
        "hf-file": tmp_path / "hf-new" / "trainer_state.json",
        # another trainer's log under lorafit's file name is read by its shape, not taken as an empty log
        "lf-as-log.jsonl": write_jsonl(tmp_path / "renamed" / "log.jsonl", lf_lines(recs)).parent,
    }
    for name, path in shapes.items():
        assert same(diagnose_run(path)) == same(ours), name


def test_grad_norm_and_named_eval_sets_from_trainer_state(tmp_path):
    recs = _run({"grad_explosion", "forgetting"}, seed=1, grad=True)
    ours = diagnose_run(write_jsonl(tmp_path / "lorafit" / "log.jsonl", recs).parent)
    assert {"grad_explosion", "forgetting"} <= {f.kind for f in ours}
    state = hf_state(recs, split_names={"val": "faq", "general": "general"})
    assert any("eval_faq_loss" in e for e in state["log_history"])
    src = load_source(write_json(tmp_path / "hf" / "trainer_state.json", state).parent)
    assert set(src.config) == {"source"} and {r["split"] for r in src.records if r["type"] == "eval"} == {"faq", "general"}
    theirs = diagnose_run(src.folder)
    assert [(f.kind, f.severity, f.steps) for f in theirs] == [(f.kind, f.severity, f.steps) for f in ours]


def test_llamafactory_folder_takes_trainer_state_when_it_is_as_far(tmp_path):
    """Several eval sets reach trainer_log.jsonl only as `eval_<name>_loss`, which LogCallback drops."""
    recs = _run({"overfitting"}, seed=2)
    folder = tmp_path / "saves"
    write_jsonl(folder / "trainer_log.jsonl", [ln for ln in lf_lines(recs) if "eval_loss" not in ln])
    write_json(folder / "trainer_state.json", hf_state(recs, split_names={"val": "faq"}))
    src = load_source(folder)
    assert src.kind == "llamafactory" and src.log_file.name == "trainer_state.json"
    assert "overfitting" in {f.kind for f in diagnose_run(folder)}
    # a trainer_state.json of an earlier checkpoint is not used over the further trainer_log.jsonl
    (folder / "trainer_state.json").unlink()
    half = _total(recs) // 2
    write_json(folder / f"checkpoint-{half}" / "trainer_state.json", hf_state([r for r in recs if r["step"] <= half]))
    assert load_source(folder).log_file.name == "trainer_log.jsonl"


def test_hf_output_folder_uses_its_latest_checkpoint(tmp_path):
    recs = _run({"overfitting"}, seed=2)
    out = tmp_path / "out"
    half, total = _total(recs) // 2, _total(recs)
    write_json(out / f"checkpoint-{half}" / "trainer_state.json", hf_state([r for r in recs if r["step"] <= half]))
    write_json(out / f"checkpoint-{total}" / "trainer_state.json", hf_state(recs))
    (out / f"checkpoint-{total}" / "adapter_config.json").write_text("{}")
    assert load_source(out).log_file == out / f"checkpoint-{total}" / "trainer_state.json"
    assert same(diagnose_run(out)) == same(diagnose_run(out / f"checkpoint-{total}"))
    assert "overfitting" in {f.kind for f in diagnose_run(out)}


# --- never a false all-clear ----------------------------------------------------------------------
@pytest.mark.parametrize("content", [b'{"foo": 1}\n{"bar": 2}\n', b"", b"\n\n", b"\x00\x01\x02PK\x03\x04" * 50,
                                     b"not json at all\nnor this\n", b'{"type": "event", "step": 0, "event": "start"}\n'])
def test_a_log_without_train_records_is_exit_2(tmp_path, capsys, content):
    (tmp_path / "log.jsonl").write_bytes(content)
    rc, out, err = cli(capsys, "diagnose", tmp_path)
    assert rc == 2 and "healthy" not in out and "No problems" not in out
    assert str(tmp_path / "log.jsonl") in err and err.count("\n") == 1
    assert "binary" in err if b"\x00" in content else "expected" in err
    assert not (tmp_path / "diagnosis.json").exists()


def test_non_utf8_log_names_the_line_but_a_cut_last_line_is_skipped(tmp_path, capsys):
    recs = _run({"overfitting"})
    text = "".join(json.dumps(r) + "\n" for r in recs).encode()
    (tmp_path / "log.jsonl").write_bytes(text[:500] + b"\xff\xfe" + text[500:])
    rc, _, err = cli(capsys, "diagnose", tmp_path)
    line = text[:500].count(b"\n") + 1
    assert rc == 2 and f"log.jsonl:{line}: not UTF-8 text (byte 500)" in err
    (tmp_path / "log.jsonl").write_bytes(text + '{"type": "train", "note": "é'.encode()[:-1])   # killed mid-character
    assert "overfitting" in {f.kind for f in diagnose_run(tmp_path)}


def test_predict_only_llamafactory_log_is_exit_2(tmp_path, capsys):
    lines = [{"current_steps": s, "total_steps": 40, "percentage": s * 2.5, "elapsed_time": "0:00:01",
              "remaining_time": "0:00:09"} for s in range(5, 45, 5)]
    write_jsonl(tmp_path / "trainer_log.jsonl", lines)
    rc, _, err = cli(capsys, "diagnose", tmp_path)
    assert rc == 2 and "trainer_log.jsonl" in err and "no training records" in err


@pytest.mark.parametrize("n", [1, 3, 9])
def test_a_handful_of_records_says_too_little_evidence(tmp_path, capsys, n):
    recs = [{"type": "train", "step": 10 * i, "loss": 2.0 - 0.01 * i} for i in range(1, n + 1)]
    recs += [{"type": "eval", "step": 10 * n, "split": "val", "eval_loss": 1.9}]
    write_jsonl(tmp_path / "log.jsonl", recs)
    rc, out, _ = cli(capsys, "diagnose", tmp_path)
    assert rc == 0 and out.startswith("Too little evidence for a verdict") and "healthy" not in out
    assert "insufficient_data" in out and "No problems found" not in out
    assert "insufficient_data" not in {f.kind for f in diagnose_records(_run(set()))}


def test_invalid_config_yaml_is_exit_2_not_defaults(tmp_path, capsys):
    write_jsonl(tmp_path / "log.jsonl", _run(set()))
    save_config(load_config(overrides={"model": "x", "data": ["y.json"]}), tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text().replace("learning_rate: 0.0001", "learning_rate: fast")
    (tmp_path / "config.yaml").write_text(text)
    line = text.splitlines().index("learning_rate: fast") + 1
    rc, out, err = cli(capsys, "diagnose", tmp_path)
    assert rc == 2 and out == "" and f"config.yaml:{line}" in err and "field 'learning_rate'" in err
    (tmp_path / "config.yaml").write_text("learning_rate: [1\nmodel: x\n")
    rc, _, err = cli(capsys, "diagnose", tmp_path)
    assert rc == 2 and "config.yaml:" in err and "invalid YAML" in err
    (tmp_path / "config.yaml").write_bytes(b"\xff\xfe\x00")
    assert cli(capsys, "diagnose", tmp_path)[0] == 2


def test_missing_and_wrong_files_are_one_line_exit_2(tmp_path, capsys):
    cases = {
        tmp_path / "nope": "not found",
        tmp_path: "no training log in this folder",
        write_json(tmp_path / "s" / "trainer_state.json", {"global_step": 3}): "log_history",
        write_jsonl(tmp_path / "t" / "x.jsonl", [{"a": 1}]): "expected",
    }
    (tmp_path / "bad.json").write_bytes(b"\x89PNG\r\n")
    cases[tmp_path / "bad.json"] = "not a JSON file"
    for path, words in cases.items():
        rc, _, err = cli(capsys, "diagnose", path)
        assert rc == 2 and words in err and err.count("\n") == 1, (path, err)
    lf = write_jsonl(tmp_path / "lf" / "trainer_log.jsonl", lf_lines(_run(set()))).parent
    rc, _, err = cli(capsys, "diagnose", lf, "--config", tmp_path / "launch.yaml")
    assert rc == 2 and "launch.yaml" in err and "not found" in err


# --- fixes in the tool's own words ----------------------------------------------------------------
LF_YAML = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: {lr}
num_train_epochs: 1.0
lr_scheduler_type: linear
warmup_ratio: 0.03
bf16: true

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 200
"""


def _lf_run(tmp_path: Path) -> tuple[Path, Path, list[dict], float]:
    recs = _run({"overfitting", "fluctuation"}, seed=0)
    lr = max(r["lr"] for r in recs if r["type"] == "train")
    folder = write_jsonl(tmp_path / "saves" / "trainer_log.jsonl", lf_lines(recs)).parent
    launch = tmp_path / "llama3_lora_sft.yaml"
    launch.write_text(LF_YAML.format(lr=f"{lr:.6e}"), encoding="utf-8")
    return folder, launch, recs, lr


def test_llamafactory_config_maps_to_the_same_findings_as_the_lorafit_config(tmp_path):
    folder, launch, recs, lr = _lf_run(tmp_path)
    src = load_source(folder, launch)
    assert src.config["learning_rate"] == pytest.approx(lr) and src.config["batch_size"] == 2
    assert src.config["lora_dropout"] == 0.0 and src.config["max_grad_norm"] == 1.0   # LF / HF defaults
    total = _total(recs)
    assert src.config["effective_warmup_steps"] == int(np.ceil(0.03 * total))
    run = tmp_path / "lorafit"
    write_jsonl(run / "log.jsonl", recs)
    save_config(load_config(overrides={
        "model": "x", "data": ["y.json"], "learning_rate": lr, "batch_size": 2, "num_epochs": 1,
        "lr_scheduler": "linear", "warmup_ratio": 0.03, "warmup_steps": 0, "lora_dropout": 0.0, "lora_rank": 8,
        "max_length": 2048, "logging_steps": 10, "eval_steps": 200, "save_steps": 500, "val_size": 0.1,
        "dtype": "bfloat16"}), run / "config.yaml")
    ours, theirs = diagnose_run(run), diagnose_run(folder, config=launch)
    assert [(f.kind, f.severity, f.steps) for f in theirs] == [(f.kind, f.severity, f.steps) for f in ours]
    over = next(f for f in theirs if f.kind == "overfitting")
    assert over.config_patch["early_stopping_steps"] == 3 and "num_train_epochs" in over.config_patch
    assert "num_epochs" not in over.config_patch and "augment" not in over.config_patch
    saved = json.loads((folder / "diagnosis.json").read_text())
    assert [d["config_patch"] for d in saved] == [f.config_patch for f in theirs]


def test_write_config_gives_a_llamafactory_yaml(tmp_path, capsys):
    folder, launch, recs, lr = _lf_run(tmp_path)
    fixed = tmp_path / "fixed.yaml"
    rc, out, _ = cli(capsys, "diagnose", folder, "--config", launch, "--write-config", fixed)
    assert rc == 0 and "overfitting" in out and "early_stopping_steps: 3" in out
    cfg = yaml.safe_load(fixed.read_text())
    original = yaml.safe_load(launch.read_text())
    assert set(cfg) <= LF_FIELDS, set(cfg) - LF_FIELDS
    assert cfg["learning_rate"] < lr and cfg["model_name_or_path"] == original["model_name_or_path"]
    assert cfg["early_stopping_steps"] == 3 and cfg["load_best_model_at_end"] is True
    assert cfg["metric_for_best_model"] == "eval_loss" and cfg["save_strategy"] == cfg["eval_strategy"] == "steps"
    assert cfg["save_steps"] % cfg["eval_steps"] == 0 and cfg["lora_dropout"] > 0 and cfg["neftune_noise_alpha"] == 5.0
    assert cfg["num_train_epochs"] < 1.0 and "warmup_ratio" not in cfg and cfg["warmup_steps"] >= 20
    assert fixed.read_text().startswith("# LLaMA-Factory config from")
    _parse_with_llamafactory(fixed)


def _parse_with_llamafactory(path: Path) -> None:
    """LLaMA-Factory's own reader (OmegaConf, then HfArgumentParser over its dataclasses), when installed."""
    try:
        from omegaconf import OmegaConf
        from llamafactory.hparams import get_train_args
    except ImportError:
        return
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    args = OmegaConf.to_container(OmegaConf.load(path))
    args.update(output_dir=str(path.parent / "lf-out"), use_cpu=True)   # bf16 on a CPU-only machine needs use_cpu
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    assert finetuning_args.early_stopping_steps == 3 and training_args.load_best_model_at_end


def test_write_config_without_a_launch_config_is_a_key_list(tmp_path):
    recs = _run({"overfitting"}, seed=2)
    lf = write_jsonl(tmp_path / "lf" / "trainer_log.jsonl", lf_lines(recs)).parent
    diagnose_run(lf, write_config=tmp_path / "lf.yaml")
    text = (tmp_path / "lf.yaml").read_text()
    assert "no launch config was given" in text and set(yaml.safe_load(text)) <= LF_FIELDS
    hf = write_json(tmp_path / "hf" / "trainer_state.json", hf_state(recs)).parent
    diagnose_run(hf, write_config=tmp_path / "hf.yaml")
    text = (tmp_path / "hf.yaml").read_text()
    keys = yaml.safe_load(text)
    assert "early_stopping_steps" not in keys and "lora_dropout" not in keys
    assert "EarlyStoppingCallback(early_stopping_patience=3)" in text and "LoraConfig(lora_dropout=" in text
    from transformers import HfArgumentParser, TrainingArguments

    (ta,) = HfArgumentParser(TrainingArguments).parse_dict({**keys, "output_dir": str(tmp_path / "o")})
    assert ta.load_best_model_at_end and ta.num_train_epochs == keys["num_train_epochs"]


def test_bad_llamafactory_config_names_file_line_and_field(tmp_path, capsys):
    folder, launch, _, _ = _lf_run(tmp_path)
    launch.write_text(launch.read_text().replace("gradient_accumulation_steps: 1", "gradient_accumulation_steps: many"))
    rc, out, err = cli(capsys, "diagnose", folder, "--config", launch)
    line = launch.read_text().splitlines().index("gradient_accumulation_steps: many") + 1
    assert rc == 2 and f"{launch}:{line}" in err and "field 'gradient_accumulation_steps'" in err
    with pytest.raises(ConfigError):
        load_source(folder, tmp_path / "saves" / "trainer_log.jsonl")   # not a YAML mapping


def test_llamafactory_yaml_strings_read_as_numbers(tmp_path):
    folder, launch, _, _ = _lf_run(tmp_path)
    launch.write_text(launch.read_text().replace("learning_rate: ", "learning_rate: '").replace(
        "\nnum_train_epochs", "'\nnum_train_epochs").replace("warmup_ratio: 0.03", "warmup_steps: 1e2"))
    src = load_source(folder, launch)
    assert isinstance(src.config["learning_rate"], float) and src.config["effective_warmup_steps"] == 100


# --- report -----------------------------------------------------------------------------------------
def test_report_on_a_llamafactory_folder(tmp_path, capsys):
    folder, launch, _, _ = _lf_run(tmp_path)
    (folder / "training_args.yaml").write_text(launch.read_text())   # LLaMA Board saves it there
    sets = {"faq": {"lang": "en", "n": 3, "before": {"rouge-l": 10.0}, "after": {"rouge-l": 30.0},
                    "delta": {"rouge-l": 20.0}, "loss_before": 2.0, "loss_after": 1.5}}
    write_json(folder / "eval" / "metrics.json", {"mode": "llamafactory", "sets": sets})   # `lorafit eval --out FOLDER/eval`
    rc, out, _ = cli(capsys, "report", folder)
    assert rc == 0
    md = (folder / "report.md").read_text()
    assert "overfitting" in md and "Verdict:" in md and (folder / "loss.png").is_file()
    assert "llamafactory" in md   # the config section says where the settings came from
    assert "Evaluation metrics" in md and "| faq |" in md
    with pytest.raises(RunError):
        diagnose_run(tmp_path / "missing")
    assert format_findings(diagnose_run(folder)).startswith("Diagnosis:")
