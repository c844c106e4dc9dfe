"""lorafit.trackers: what each tracker wrote, read back with that library's own reader (TensorBoard's
EventAccumulator, the wandb offline run folder, mlflow.search_runs on the file store); each test skips
cleanly where its library is absent, and a missing library named in report_to is a ConfigError."""
from __future__ import annotations

import builtins
import json
import struct
import time

import pytest

from lorafit.errors import ConfigError
from lorafit.trackers import Trackers, metrics_of

RECORDS = [
    {"type": "event", "step": 0, "event": "start", "total_steps": 30},
    {"type": "eval", "step": 0, "split": "faq", "eval_loss": 2.5},
    {"type": "train", "step": 10, "epoch": 0.3, "loss": 2.0, "lr": 1e-4, "grad_norm": 0.8, "tokens_per_s": 900.0},
    {"type": "train", "step": 20, "epoch": 0.6, "loss": 1.5, "lr": 5e-5, "grad_norm": float("nan"), "tokens_per_s": 950.0},
    {"type": "eval", "step": 20, "split": "faq", "eval_loss": 1.9},
    {"type": "eval", "step": 20, "split": "general", "eval_loss": 2.1},
    {"type": "event", "step": 30, "event": "end"},
]
CONFIG = {"learning_rate": 1e-4, "report_to": ["tensorboard"], "val_data": {"faq": "faq.json"}}


def _feed(names: list[str], run_dir) -> None:
    t = Trackers.open(names, run_dir, CONFIG)
    for r in RECORDS:
        t.log(r)
    t.close()


def test_metric_names_and_what_is_skipped():
    assert metrics_of(RECORDS[0]) is None
    assert metrics_of(RECORDS[3]) == (20, {"train/loss": 1.5, "train/lr": 5e-5, "train/tokens_per_s": 950.0,
                                           "train/epoch": 0.6})   # NaN grad_norm left out
    assert metrics_of(RECORDS[5]) == (20, {"eval/general/loss": 2.1})
    t = Trackers.open([], None, {})
    t.log(RECORDS[2])   # none configured: a no-op
    t.close()


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _feed(["tensorboard"], tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [(e.step, round(e.value, 4)) for e in loss] == [(10, 2.0), (20, 1.5)]
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/faq/loss")] == [(0, 2.5), (20, 1.9)]
    assert "train/grad_norm" in acc.Tags()["scalars"] and len(acc.Scalars("train/grad_norm")) == 1


def test_wandb_offline_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    _feed(["wandb"], tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    from wandb.proto import wandb_internal_pb2

    # wandb-core, a separate process, may still be flushing the transaction log when finish() returns:
    # read until its `exit` record is there.
    deadline = time.monotonic() + 30
    while True:
        history, done = {}, False
        for data in _wandb_records(next(runs[0].glob("*.wandb")).read_bytes()):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            done |= kind == "exit"
            if kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                history[row["_step"]] = row
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(history) == [0, 10, 20]
    assert history[10]["train/loss"] == 2.0 and history[20]["train/loss"] == 1.5 and history[20]["train/lr"] == 5e-5
    assert history[0]["eval/faq/loss"] == 2.5 and history[20]["eval/general/loss"] == 2.1


def _wandb_records(data: bytes):
    """Records of a .wandb transaction log (wandb 0.31 reads it only in its Go core): a 7-byte ':W&B'
    header, then LevelDB-style 32 KiB blocks of (crc32, length, type) chunks, each a wandb protobuf."""
    assert data[:4] == b":W&B"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:   # zero padding to the end of the block
            pos += left - 7
            continue
        if pos + n > len(data):   # a chunk still being written
            return
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):   # FULL or LAST chunk
            yield buf
            buf = b""


def test_mlflow_local_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _feed(["mlflow"], tmp_path)
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["lorafit"])
    assert len(runs) == 1 and runs["metrics.train/loss"][0] == 1.5 and runs["params.learning_rate"][0] == "0.0001"
    history = mlflow.MlflowClient(uri).get_metric_history(runs["run_id"][0], "eval/faq/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.5), (20, 1.9)]
    assert runs["status"][0] == "FINISHED"


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_library_names_report_to_and_the_extra(tmp_path, monkeypatch, name):
    real = builtins.__import__
    blocked = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}[name]

    def fake(mod, *a, **k):
        if mod == blocked or mod.startswith(blocked + "."):
            raise ImportError(mod)
        return real(mod, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ConfigError) as e:
        Trackers.open([name], tmp_path, CONFIG)
    assert e.value.field == "report_to" and f"lorafit[{name}]" in str(e.value)
    with pytest.raises(ConfigError):
        Trackers.open(["neptune"], tmp_path, CONFIG)


def test_lorafit_train_mirrors_its_log_to_tensorboard(tmp_path, tiny_model_dir):
    """`report_to: [tensorboard]` in a real run: TensorBoard holds exactly log.jsonl's losses."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorafit.config import load_config
    from lorafit.demoset import write_demo_data
    from lorafit.training import loop

    train, val = write_demo_data(tmp_path / "data")
    out = tmp_path / "run"
    loop.train(load_config(None, {"model": tiny_model_dir, "data": [str(train)], "val_data": {"faq": str(val)},
                                  "output_dir": str(out), "max_steps": 4, "max_length": 64, "logging_steps": 2,
                                  "eval_steps": 2, "device": "cpu", "report_to": ["tensorboard"]}), progress=False)
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("train/loss")] == \
        [(r["step"], round(r["loss"], 5)) for r in recs if r["type"] == "train"]
    assert [e.step for e in acc.Scalars("eval/faq/loss")] == [r["step"] for r in recs if r["type"] == "eval"]
