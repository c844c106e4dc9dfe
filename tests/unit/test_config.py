import math

import pytest

from lorafit.config import TrainConfig, config_help, load_config, save_config
from lorafit.errors import ConfigError

BASE = {"model": "org/model", "data": ["x.json"]}


def test_defaults_are_the_write_ups():
    c = load_config(None, BASE)
    assert (c.num_epochs, c.learning_rate, c.batch_size, c.max_length) == (5, 1e-4, 2, 1024)
    assert (c.lora_alpha, c.lora_rank, c.lora_dropout) == (32, 16, 0.1)
    assert (c.warmup_ratio, c.warmup_steps, c.max_grad_norm) == (0.1, 20, 1.0)
    assert c.target_modules == "all-linear"


@pytest.mark.parametrize("total,expected", [(50, 20), (200, 20), (201, 21), (1000, 100), (10, 10)])
def test_warmup_rule_takes_the_larger_capped_at_total(total, expected):
    c = load_config(None, BASE)
    assert c.resolve_warmup(total) == expected == min(total, max(20, math.ceil(0.1 * total)))


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: org/m\ndata: a.json\nval_data:\n  one: v1.json\nlora_rank: 8\n")
    c = load_config(p, ["--lora_rank=4", "--val_data.two=v2.json", "--learning_rate=5e-5"])
    assert c.lora_rank == 4 and c.learning_rate == 5e-5
    assert set(c.val_data) == {"one", "two"}
    assert c.data == [str(tmp_path / "a.json")]  # relative paths resolve against the YAML's folder


def test_unknown_key_suggests_closest_with_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: org/m\ndata: a.json\nlearning_rat: 1e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "learning_rate" in str(e.value) and e.value.line == 3 and e.value.field == "learning_rat"


@pytest.mark.parametrize("key,value", [("lora_rank", 0), ("learning_rate", -1e-4), ("max_length", 8),
                                       ("lora_dropout", 1.5), ("lr_scheduler", "step"), ("batch_size", "two"),
                                       ("pack_tokens", 4)])
def test_invalid_values_name_the_field(tmp_path, key, value):
    p = tmp_path / "c.yaml"
    p.write_text(f"model: org/m\ndata: a.json\n{key}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.field == key and e.value.file == str(p) and e.value.line == 3


def test_resolved_config_round_trips(tmp_path):
    c = load_config(None, BASE)
    c.effective_warmup_steps, c.total_steps = 20, 100
    save_config(c, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "effective_warmup_steps: 20" in text
    again = load_config(tmp_path / "config.yaml")
    assert again.lora_rank == c.lora_rank and again.effective_warmup_steps is None  # recomputed, never trusted


def test_every_key_has_help():
    text = config_help()
    for name in ("learning_rate", "weight_decay", "l2_penalty", "general_ratio", "early_stopping_patience"):
        assert name in text
    assert isinstance(TrainConfig(), TrainConfig)


def test_shipped_configs_validate():
    from pathlib import Path

    for p in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        load_config(p)  # model/data may be absent on this machine: only the schema is checked


def test_api_names_stay_functions_after_subpackage_imports():
    import importlib

    import lorafit

    for mod in ("lorafit.evaluation.run", "lorafit.diagnosis.detectors", "lorafit.reporting.plots", "lorafit.training.loop"):
        importlib.import_module(mod)
    for name in ("train", "evaluate", "diagnose", "report", "generate", "merge", "score", "demo"):
        assert callable(getattr(lorafit, name)), name


def test_benchmark_paths_resolve_against_the_config_file(tmp_path):
    """Like data paths: a config names its benchmark folders relative to itself."""
    from lorafit.config import load_config

    (tmp_path / "proj" / "bench" / "mmlu-en").mkdir(parents=True)
    p = tmp_path / "proj" / "c.yaml"
    p.write_text("model: org/m\ndata: a.json\nbenchmarks: [bench/mmlu-en]\n")
    assert load_config(p).benchmarks == [str((tmp_path / "proj" / "bench" / "mmlu-en").resolve())]


def test_a_bad_value_is_traced_to_where_it_was_set(tmp_path):
    """An out-of-range override is the override's fault, not the file's (and a file's names its line)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata: [d.json]\nlearning_rate: 0.001\nbalance_steps: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, ["--balance_steps=-1"])
    assert e.value.file == "override" and e.value.line is None and e.value.field == "balance_steps"
    cfg.write_text("model: m\ndata: [d.json]\nlearning_rate: -0.001\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, ["--balance_steps=2"])
    assert e.value.file == str(cfg) and e.value.line == 3 and e.value.field == "learning_rate"


def test_quantize_base_null_means_none(tmp_path):
    """`quantize_base: null` is LLaMA-Factory's way to say no quantization (its `quantization_bit: null`)."""
    p = tmp_path / "c.yaml"
    p.write_text("model: m\ndata: [d.json]\nquantize_base: null\n")
    assert load_config(p).quantize_base == "none" and TrainConfig().quantize_base == "none"
    for bad in ("quantize_base: fp4", "quantize_base: fp8\ndistributed: fsdp"):
        p.write_text(f"model: m\ndata: [d.json]\n{bad}\n")
        with pytest.raises(ConfigError, match="quantize_base"):
            load_config(p)
