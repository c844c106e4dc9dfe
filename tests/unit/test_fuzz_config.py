"""Property-based fuzzing of config values: every number in the schema, given NaN, inf, negatives, zero,
huge floats and 5,000-digit integers (as Python values, as YAML text and as --key=value overrides),
is either accepted -- exactly when it lies in the range docs/reliability.md documents -- or refused
with a ConfigError naming the field in a message of one short line. Nothing else: no traceback, no
silently accepted NaN.

The documented ranges are written out below independently of `lorafit.config.RANGES`, so the code
and the docs are held to each other. 200 derandomized examples per test (about 5 s).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.cli import main
from lorafit.config import NUMERIC, load_config
from lorafit.errors import ConfigError

GOOD = str(Path(__file__).resolve().parents[1] / "data" / "bad" / "good.json")
BASE = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "data": [GOOD], "general_data": [GOOD]}
_HUNT = int(os.environ.get("LORAFIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_HUNT or 200, deadline=None, derandomize=not _HUNT, database=None,
                suppress_health_check=[HealthCheck.too_slow])

INT_MAX = 2**31 - 1
inf = math.inf
# name -> (low, high, low included, high included, integer field): docs/reliability.md, "Config values".
DOCUMENTED = {
    "val_size": (0, inf, True, False, False), "general_ratio": (0, 1, True, False, False),
    "max_length": (16, INT_MAX, True, True, True), "max_samples": (1, INT_MAX, True, True, True),
    "augment_copies": (1, INT_MAX, True, True, True), "lora_rank": (1, 16384, True, True, True),
    "lora_alpha": (0, inf, False, False, False), "lora_dropout": (0, 1, True, False, False),
    "num_epochs": (0, 1e6, False, True, False), "max_steps": (1, INT_MAX, True, True, True),
    "learning_rate": (0, inf, False, False, False), "batch_size": (1, INT_MAX, True, True, True),
    "gradient_accumulation_steps": (1, INT_MAX, True, True, True), "min_lr_ratio": (0, 1, True, False, False),
    "warmup_ratio": (0, 1, True, False, False), "warmup_steps": (0, INT_MAX, True, True, True),
    "weight_decay": (0, inf, True, False, False), "l2_penalty": (0, inf, True, False, False),
    "max_grad_norm": (0, inf, True, False, False), "adam_beta1": (0, 1, True, False, False),
    "adam_beta2": (0, 1, True, False, False), "adam_eps": (0, inf, False, False, False),
    "seed": (0, 2**32 - 1, True, True, True), "max_nonfinite_steps": (1, INT_MAX, True, True, True),
    "early_stopping_patience": (0, INT_MAX, True, True, True), "eval_steps": (1, INT_MAX, True, True, True),
    "logging_steps": (1, INT_MAX, True, True, True), "save_steps": (1, INT_MAX, True, True, True),
    "save_total_limit": (1, INT_MAX, True, True, True), "eval_batch_size": (1, INT_MAX, True, True, True),
    "max_eval_samples": (1, INT_MAX, True, True, True), "max_new_tokens": (1, INT_MAX, True, True, True),
    "pack_tokens": (16, INT_MAX, True, True, True), "dist_timeout": (0, 31536000, False, True, False),
    "forgetting_budget": (0, inf, True, False, False), "balance_steps": (0, INT_MAX, True, True, True),
}
SPECIAL = {"max_steps": [-1]}  # -1: num_epochs decides

HUGE = 10**5000
EDGES = [math.nan, inf, -inf, 0, 0.0, -0.0, -1, -5, 1, 1e308, -1e308, 2**31, 2**32, 2**63, HUGE, -HUGE,
         0.5, 0.999999, 1.0, 1.5, 16, 15, 16384, 16385, 1e-300, 31536000, 31536001]


def boundaries(name: str) -> list:
    """Each end of the documented range, and its neighbours on both sides."""
    lo, hi, _, _, is_int = DOCUMENTED[name]
    out = []
    for end in (lo, hi):
        if math.isfinite(end):
            out += [end - 1, end, end + 1] if is_int else [math.nextafter(end, -inf), float(end),
                                                            math.nextafter(end, inf)]
    return out


values = st.one_of(
    st.sampled_from(EDGES),
    st.integers(min_value=-10**6, max_value=10**6),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
)


def documented_ok(name: str, value: object) -> bool:
    """Is `value` valid for `name` by the documented ranges (and the documented type rules)?"""
    lo, hi, lo_in, hi_in, is_int = DOCUMENTED[name]
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if is_int:
        if isinstance(value, float) and not value.is_integer():
            return False  # 2.5 for a count: refused, not rounded
        value = int(value)
        if value in SPECIAL.get(name, []):
            return True
    elif abs(value) > 1.7e308:
        return False  # not a float at all (10**5000)
    if not ((lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)):
        return False
    return not (name == "val_size" and value >= 1 and value != int(value))  # a share, or a whole count


def _assert_refused(e: ConfigError, name: str) -> None:
    assert e.field == name, (name, str(e))
    assert len(str(e)) < 400 and "\n" not in str(e), str(e)


def test_every_number_in_the_schema_has_a_documented_range():
    assert set(NUMERIC) == set(DOCUMENTED)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [n for n in NUMERIC if f"`{n}`" not in docs]
    assert not missing, f"docs/reliability.md does not list the range of {missing}"


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_every_edge_of_every_field(name):
    """Exhaustive over the edge values and each documented boundary, for every numeric field."""
    for value in EDGES + boundaries(name):
        test_python_values.hypothesis.inner_test(name=name, value=value)


@FUZZ
@given(name=st.sampled_from(sorted(DOCUMENTED)), value=values)
def test_python_values(name, value):
    try:
        cfg = load_config(None, {**BASE, name: value})
    except ConfigError as e:
        assert not documented_ok(name, value), (name, value, str(e))
        _assert_refused(e, name)
        return
    assert documented_ok(name, value), (name, value)
    assert getattr(cfg, name) == value


def _yaml(value: object) -> str:
    if isinstance(value, float):
        return ".nan" if math.isnan(value) else ".inf" if value == inf else "-.inf" if value == -inf else repr(value)
    return str(value) if abs(value) < 10**4000 else ("-" if value < 0 else "") + "7" * 5000


@FUZZ
@given(name=st.sampled_from(sorted(DOCUMENTED)), value=values)
def test_yaml_text_and_overrides(tmp_path_factory, name, value):
    text = _yaml(value)
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(f"model: {BASE['model']}\ndata: {GOOD}\ngeneral_data: {GOOD}\n{name}: {text}\n")
    for how in ("yaml", "override"):
        try:
            if how == "yaml":
                load_config(path)
            else:
                load_config(None, [f"--model={BASE['model']}", f"--data={GOOD}", f"--general_data={GOOD}",
                                   f"--{name}={text}"])
        except ConfigError as e:
            assert e.field in (name, None), (how, name, text[:40], str(e))  # None: a 5,000-digit integer
            assert len(str(e)) < 400 and "\n" not in str(e), str(e)
            continue
        parsed = float(text.replace(".nan", "nan").replace(".inf", "inf")) if isinstance(value, float) else value
        assert documented_ok(name, parsed), (how, name, text[:40])


@pytest.mark.parametrize("override", ["--seed=" + "9" * 5000, "--val_size=.nan", "--num_epochs=.inf",
                                      "--adam_beta1=2", "--adam_eps=-1e-8", "--lora_rank=1000000000",
                                      "--max_grad_norm=.nan", "--max_samples=-5", "--batch_size=0",
                                      "--learning_rate=1e400", "--dist_timeout=-1", "--forgetting_budget=.inf"])
def test_cli_exit_status_2(capsys, tmp_path, override):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {BASE['model']}\ndata: {GOOD}\n")
    rc = main(["train", str(cfg), override, f"--output_dir={tmp_path / 'out'}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
