"""The bad-input corpus (tests/data/bad/): every bad data file, config and predictions file must end in
one readable line naming file, line and field, exit status 2, and no output folder at all.

Most cases call `lorafit.cli.main` in-process (it returns the exit status; 60 subprocesses each
importing torch would take minutes); `test_real_cli_subprocess` runs a few through the real
`python -m lorafit train` to hold the in-process shortcut to the real thing.

Unwritable output folders: the tests run as root, and root ignores permission bits (chmod 555 does
not stop it), so the cases use places even root cannot write: a path below a regular file, /proc and
/sys (pseudo file systems), and a read-only bind mount made in a private mount namespace with
`unshare -rm` (skipped where unshare is not allowed).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorafit.cli import main

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
ROOT = Path(__file__).resolve().parents[2]

# (file under data/, line, field, message fragment); line/field None where the error has none.
DATA_CASES = [
    ("latin1.json", 4, None, "not valid UTF-8 (byte 156)"),
    ("latin1.csv", 3, None, "not valid UTF-8"),
    ("utf16.json", 1, None, "not valid UTF-8 (byte 0)"),
    ("truncated.json", 10, None, "invalid JSON: Unterminated string"),
    ("unterminated_array.json", 4, None, "unterminated JSON array (file truncated?)"),
    ("pretty_object.jsonl", 1, None, "invalid JSON line"),
    ("malformed_line.jsonl", 3, None, "invalid JSON line: Expecting property name"),
    ("deep_nesting.json", 1, None, "invalid JSON: nested too deeply"),
    ("huge_int.jsonl", 2, None, "invalid JSON line: Exceeds the limit (4300 digits)"),
    ("output_list.json", 7, "output", "expected a string, got list"),
    ("instruction_object.jsonl", 2, "instruction", "expected a string, got dict"),
    ("instruction_bool.jsonl", 1, "instruction", "expected a string, got bool"),
    ("output_null.jsonl", 2, "output", "missing field"),
    ("missing_output.jsonl", 3, "output", "missing field"),
    ("empty_output.json", 12, "output", "empty field"),
    ("blank_instruction.jsonl", 1, "instruction", "empty field"),
    ("record_not_object.json", 3, None, "record must be a JSON object, got str"),
    ("history_not_list.json", 1, "history", "history must be a list"),
    ("history_bad_pair.json", 1, "history", "history[1] must be a [query, response] pair"),
    ("surrogate.jsonl", 2, "instruction", "unpaired surrogate"),
    ("empty.json", None, None, "file is empty"),
    ("blank.jsonl", None, None, "file is empty"),
    ("no_records.json", None, None, "no records"),
    ("wrong_columns.csv", 2, "instruction", "missing field"),
    ("extra_fields.csv", 3, None, "row has more fields than the header"),
    ("header_only.csv", None, None, "no records"),
    ("empty_response.csv", 3, "response", "empty field"),
    ("sharegpt_bad_role.json", 2, "conversations[1].from", "unknown role 'narrator'"),
    ("sharegpt_role_list.json", 1, "conversations[0].from", "unknown role ['human']"),
    ("sharegpt_ends_with_user.json", 1, "conversations", "must end with an assistant turn"),
    ("sharegpt_no_user.json", 1, "conversations", "has no user turn"),
    ("sharegpt_empty.json", 1, "conversations", "must be a non-empty list of turns"),
    ("sharegpt_turn_not_object.json", 1, "conversations[0]", "turn must be an object"),
    ("messages_missing_content.jsonl", 1, "messages[1].content", "missing field"),
    ("text_no_assistant.jsonl", 1, "text", "'### Human: question ### Assistant: answer'"),
    ("data.txt", None, None, "unknown file type '.txt'"),
    ("one_line_array_bad_record.json", 1, "output", "expected a string, got list (record 4 of the array)"),
    ("array_missing_comma.json", 3, None, "expected ',' or ']' after the record (record 1 of the array)"),
    ("array_trailing_data.json", 4, None, "extra data after the closing ']'"),
]

# (LLaMA-Factory dataset name in dataset_info/dataset_info.json, file reported, field, fragment)
DATASET_INFO_CASES = [
    ("hub_only", "dataset_info.json", "hub_only.file_name", "hub datasets are not readable offline"),
    ("not_an_object", "dataset_info.json", "not_an_object", "entry must be a JSON object"),
    ("file_name_number", "dataset_info.json", "file_name_number.file_name", "must be a file name"),
    ("columns_list", "dataset_info.json", "columns_list.columns", "must be an object mapping names to strings"),
    ("ghost", "missing.json", None, "file not found"),
    ("no_such_name", "dataset_info.json", "no_such_name", "no dataset named 'no_such_name'"),
]

# (config under configs/, file reported (relative to BAD), line, field, fragment)
CONFIG_CASES = [
    ("unknown_key", "configs/unknown_key.yaml", 4, "learning_rat", "did you mean 'learning_rate'?"),
    ("rank_zero", "configs/rank_zero.yaml", 4, "lora_rank", "must be in [1, 16384], got 0"),
    ("rank_negative", "configs/rank_negative.yaml", 4, "lora_rank", "must be in [1, 16384], got -8"),
    ("rank_string", "configs/rank_string.yaml", 4, "lora_rank", "expected int, got 'sixteen'"),
    ("lr_zero", "configs/lr_zero.yaml", 4, "learning_rate", "must be > 0, got 0.0"),
    ("lr_negative", "configs/lr_negative.yaml", 4, "learning_rate", "must be > 0, got -0.0001"),
    ("max_length_small", "configs/max_length_small.yaml", 4, "max_length", "must be >= 16, got 8"),
    ("dropout_one", "configs/dropout_one.yaml", 4, "lora_dropout", "must be in [0, 1)"),
    ("unknown_template", "configs/unknown_template.yaml", 4, "template", "unknown template 'vicuna'"),
    ("unknown_format", "configs/unknown_format.yaml", 4, "format", "unknown format 'parquet'"),
    ("bad_scheduler", "configs/bad_scheduler.yaml", 4, "lr_scheduler", "got 'exponential'"),
    ("unknown_augment", "configs/unknown_augment.yaml", 4, "augment", "unknown augmentation 'back_translation'"),
    ("quantize_base_unknown", "configs/quantize_base_unknown.yaml", 4, "quantize_base", "must be one of ('none', 'fp8'), got 'nf4'"),
    ("quantize_base_unfused", "configs/quantize_base_unfused.yaml", 4, "quantize_base", "needs fused_kernels: auto or true"),
    ("columns_not_mapping", "configs/columns_not_mapping.yaml", 4, "columns", "expected dict[str, str]"),
    ("general_ratio_no_data", "configs/general_ratio_no_data.yaml", 4, "general_ratio", "general_data lists no files"),
    ("invalid_yaml", "configs/invalid_yaml.yaml", 4, None, "invalid YAML"),
    ("not_mapping", "configs/not_mapping.yaml", 1, None, "config must be a mapping"),
    ("empty", "configs/empty.yaml", None, None, "config file is empty"),
    ("latin1", "configs/latin1.yaml", None, None, "not UTF-8 text (byte"),
    ("no_data", "configs/no_data.yaml", None, "data", "is required"),
    ("wrong_column_map", "good.json", 2, "prompt_text", "missing field"),
    ("missing_data_file", "no-such-file.json", None, None, "file not found"),
    ("missing_val_file", "no-such-dev.json", None, None, "file not found"),
    ("val_size_too_big", None, None, "val_size", "leaves no training examples"),
    ("missing_model", "./no-such-model", None, "model", "model path not found"),
    ("model_not_hf_folder", "data", None, "model", "folder has no config.json"),
    ("seed_huge", "configs/seed_huge.yaml", 4, None, "integer of 5,000 digits is out of range"),
    ("val_size_nan", "configs/val_size_nan.yaml", 4, "val_size", "must be a finite number, got nan"),
    ("num_epochs_inf", "configs/num_epochs_inf.yaml", 4, "num_epochs", "must be a finite number, got inf"),
    ("adam_beta1_two", "configs/adam_beta1_two.yaml", 4, "adam_beta1", "must be in [0, 1), got 2.0"),
    ("adam_eps_negative", "configs/adam_eps_negative.yaml", 4, "adam_eps", "must be > 0, got -1e-08"),
    ("lora_rank_huge", "configs/lora_rank_huge.yaml", 4, "lora_rank", "must be in [1, 16384], got 1000000000"),
    ("max_grad_norm_nan", "configs/max_grad_norm_nan.yaml", 4, "max_grad_norm", "must be a finite number, got nan"),
    ("max_samples_negative", "configs/max_samples_negative.yaml", 4, "max_samples", "must be >= 1, got -5"),
    ("dist_timeout_zero", "configs/dist_timeout_zero.yaml", 4, "dist_timeout", "must be in (0, 31536000], got 0.0"),
    ("report_to_unknown", "configs/report_to_unknown.yaml", 4, "report_to", "unknown 'neptune'"),
    ("forgetting_budget_negative", "configs/forgetting_budget_negative.yaml", 4, "forgetting_budget",
     "must be >= 0, got -0.1"),
    ("duplicate_key", "configs/duplicate_key.yaml", 6, "lora_rank", "duplicate key (lines 4 and 6)"),
    ("general_data_folder", "data", None, None, "is a folder; expected a data file"),
    ("deep_nesting", "configs/deep_nesting.yaml", None, None, "invalid YAML: nested too deeply"),
    ("alias_bomb", "configs/alias_bomb.yaml", None, None, "YAML expands to more than 100,000 values"),
]

# (predictions file under predictions/, line, field, fragment) for `lorafit score`
PREDICTION_CASES = [
    ("not_json.jsonl", 2, None, "invalid JSON"),
    ("missing_predict.jsonl", 3, "predict", "missing field"),
    ("predict_null.jsonl", 1, "predict", "expected a string, got null"),
    ("label_int.jsonl", 2, "label", "expected a string or a list of strings, got int"),
    ("label_empty_list.jsonl", 1, "label", "empty list of references"),
    ("label_list_mixed.jsonl", 1, "label", "references must all be strings"),
    ("array_line.jsonl", 1, None, "expected a JSON object, got list"),
    ("empty.jsonl", None, None, "no predictions"),
    ("latin1.jsonl", 2, None, "not valid UTF-8"),
    ("deep_nesting.jsonl", 2, None, "invalid JSON (nested too deeply)"),
    ("huge_number.jsonl", 2, None, "invalid JSON (Exceeds the limit (4300 digits)"),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # A hub id must never reach the network from a test (and would retry for a minute).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _error_line(rc: int, err: str) -> str:
    """The one `lorafit: error:` line of a failed command; no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("lorafit: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _check(msg: str, file: str | None, line: int | None, field: str | None, fragment: str) -> None:
    if file is not None:
        assert (f"{file}:{line}" if line is not None else file) in msg, msg
        if line is None:
            assert not re.search(re.escape(file) + r":\d", msg), msg  # no line where none applies
    if field is not None:
        assert f"field '{field}'" in msg, msg
    assert fragment in msg, msg


def _train(capsys, config: Path, *extra: str) -> str:
    rc = main(["train", str(config), "--no-progress", *extra])
    return _error_line(rc, capsys.readouterr().err)


def test_corpus_has_a_case_for_every_file():
    from tests.unit.test_bad_commands import CORPUS_USED

    files = [p for d in ("data", "configs", "predictions", "models", "adapters", "blind", "runs")
             for p in (BAD / d).iterdir()]
    assert len(files) >= 100
    listed = ({c[0] for c in DATA_CASES} | {c[0] + ".yaml" for c in CONFIG_CASES} | {"output_under_file.yaml"}
              | {c[0] for c in PREDICTION_CASES} | CORPUS_USED)
    unlisted = {p.name for p in files} - listed
    assert not unlisted, f"corpus files without a test case: {sorted(unlisted)}"


def test_base_config_and_good_data_are_valid():
    """The cases differ from a valid run only by the one bad thing they test."""
    from lorafit.config import load_config
    from lorafit.data import read_examples

    cfg = load_config(BAD / "base.yaml")
    assert len(read_examples(cfg.data[0])) == 4


@pytest.mark.parametrize("name,line,field,fragment", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(capsys, tmp_path, name, line, field, fragment):
    path = BAD / "data" / name
    msg = _train(capsys, BAD / "base.yaml", f"--data={path}", f"--output_dir={tmp_path / 'out'}")
    _check(msg, str(path), line, field, fragment)
    assert list(tmp_path.iterdir()) == []  # no output folder, no probe file left behind


@pytest.mark.parametrize("name,file,field,fragment", DATASET_INFO_CASES, ids=[c[0] for c in DATASET_INFO_CASES])
def test_bad_dataset_info_entry(capsys, tmp_path, name, file, field, fragment):
    info = BAD / "dataset_info" / "dataset_info.json"
    msg = _train(capsys, BAD / "base.yaml", f"--data={info}#{name}", f"--output_dir={tmp_path / 'out'}")
    _check(msg, str(BAD / "dataset_info" / file), None, field, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,file,line,field,fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(capsys, tmp_path, name, file, line, field, fragment):
    config = BAD / "configs" / f"{name}.yaml"
    msg = _train(capsys, config, f"--output_dir={tmp_path / 'out'}")
    if file is not None and not file.startswith("./"):
        file = str(config) if file.startswith("configs/") else str(BAD / file)
    _check(msg, file, line, field, fragment)
    assert list(tmp_path.iterdir()) == []


def test_enormous_csv_field(capsys, tmp_path):
    """A 200 kB CSV field (over the csv module's 128 kB limit): generated, not kept in the corpus."""
    data = tmp_path / "enormous.csv"
    data.write_text("instruction,output\nhello,world\nbig," + "x" * 200_000 + "\n", encoding="utf-8")
    msg = _train(capsys, BAD / "base.yaml", f"--data={data}", f"--output_dir={tmp_path / 'out'}")
    _check(msg, str(data), 3, None, "field larger than field limit")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override,field,fragment", [
    ("--learning_rat=1e-3", "learning_rat", "did you mean 'learning_rate'?"),
    ("--lora_rank=0", "lora_rank", "must be in [1, 16384], got 0"),
    ("--lora_rank.r=4", "lora_rank.r", "'lora_rank' is not a mapping"),
    ("--max_length=abc", "max_length", "expected int, got 'abc'"),
    ("--lora-rank", None, "must look like --key=value"),
])
def test_bad_override(capsys, tmp_path, override, field, fragment):
    msg = _train(capsys, BAD / "base.yaml", override, f"--output_dir={tmp_path / 'out'}")
    _check(msg, None, None, field, fragment)
    assert list(tmp_path.iterdir()) == []


def test_missing_config_file(capsys, tmp_path):
    msg = _train(capsys, tmp_path / "nope.yaml")
    _check(msg, str(tmp_path / "nope.yaml"), None, None, "config file not found")


@pytest.mark.parametrize("output_dir,fragment", [
    (str(BAD / "good.json" / "run"), "is not a folder"),            # parent is a regular file
    ("/proc/lorafit-test-run", "cannot be created"),                # pseudo fs: root passes os.access
    ("/sys/lorafit-test-run/sub", "cannot be created"),
])
def test_unwritable_output_dir(capsys, output_dir, fragment):
    msg = _train(capsys, BAD / "base.yaml", f"--output_dir={output_dir}")
    _check(msg, output_dir, None, "output_dir", fragment)
    assert not Path(output_dir).exists()


def test_output_under_file_from_config(capsys):
    """The same, set in the YAML: a relative output_dir below a regular file."""
    msg = _train(capsys, BAD / "configs" / "output_under_file.yaml")
    _check(msg, None, None, "output_dir", "is not a folder")
    assert not (BAD / "good.json").is_dir()


def test_read_only_output_dir_real_cli(tmp_path):
    """A real read-only mount (root cannot write it either), via a private mount namespace."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("unshare -rm (user + mount namespace) is not allowed here")
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "run"
    script = (f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && "
              f"exec {sys.executable} -m lorafit train {BAD / 'base.yaml'} --output_dir={out} --no-progress")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    msg = _error_line(p.returncode, p.stderr)
    _check(msg, str(out), None, "output_dir", "not writable")
    assert not out.exists()


@pytest.mark.parametrize("args,file,line,field,fragment", [
    (["configs/unknown_key.yaml"], "configs/unknown_key.yaml", 4, "learning_rat", "did you mean 'learning_rate'?"),
    (["base.yaml", "--data={BAD}/data/latin1.json"], "data/latin1.json", 4, None, "not valid UTF-8"),
    (["base.yaml", "--data={BAD}/data/sharegpt_role_list.json"], "data/sharegpt_role_list.json", 1,
     "conversations[0].from", "unknown role"),
], ids=["config", "latin1", "sharegpt-role"])
def test_real_cli_subprocess(tmp_path, args, file, line, field, fragment):
    """The real `python -m lorafit train`: exit status 2, one line on stderr, no output folder."""
    args = [str(BAD / args[0]), *(a.format(BAD=BAD) for a in args[1:])]
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "lorafit", "train", *args, f"--output_dir={out}", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       timeout=120)
    _check(_error_line(p.returncode, p.stderr), str(BAD / file), line, field, fragment)
    assert not out.exists()


def test_unreachable_hub_model(capsys, tmp_path, monkeypatch):
    # Offline (no DNS), huggingface_hub retries each request 5 times with back-off sleeps of 1+2+4+8+8 s,
    # twice: 46 s of waiting. The requests and their failures stay real; only the waits between them go.
    import time
    import types

    try:  # a private module: where a huggingface_hub release moves it, the test just waits as before
        from huggingface_hub.utils import _http
    except ImportError:
        _http = None
    if _http is not None and hasattr(_http, "time"):
        monkeypatch.setattr(_http, "time", types.SimpleNamespace(**{**vars(time), "sleep": lambda s: None}))
    msg = _train(capsys, BAD / "base.yaml", "--model=no-such-org/no-such-model", f"--output_dir={tmp_path / 'out'}")
    _check(msg, "no-such-org/no-such-model", None, "model", "cannot load")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,line,field,fragment", PREDICTION_CASES, ids=[c[0] for c in PREDICTION_CASES])
def test_bad_predictions_file(capsys, name, line, field, fragment):
    pytest.importorskip("lorafit.evaluation")
    path = BAD / "predictions" / name
    rc = main(["score", str(path)])
    msg = _error_line(rc, capsys.readouterr().err)
    _check(msg, str(path), line, field, fragment)


def test_missing_predictions_file(capsys, tmp_path):
    pytest.importorskip("lorafit.evaluation")
    rc = main(["score", str(tmp_path / "nope.jsonl")])
    _check(_error_line(rc, capsys.readouterr().err), str(tmp_path / "nope.jsonl"), None, None, "not found")
