import math

import pytest

from lorafit.training.schedule import lr_at


@pytest.mark.parametrize("kind", ["cosine", "linear", "inverse_sqrt", "constant"])
def test_warmup_then_decay(kind):
    lrs = [lr_at(s, peak=1e-4, warmup=20, total=200, kind=kind) for s in range(200)]
    assert lrs[0] == pytest.approx(1e-4 / 20)
    assert all(b > a for a, b in zip(lrs[:19], lrs[1:20]))  # warmup rises
    assert lrs[19] == pytest.approx(1e-4)
    if kind != "constant":
        assert all(b <= a + 1e-15 for a, b in zip(lrs[20:], lrs[21:]))  # then never rises
        assert lrs[-1] < 0.5e-4


def test_inverse_sqrt_is_the_transformer_schedule():
    # lr ∝ min(step^-0.5, step * warmup^-1.5): after warmup it falls as 1/sqrt(step)
    a, b = lr_at(99, peak=1.0, warmup=25, total=1000, kind="inverse_sqrt"), lr_at(399, peak=1.0, warmup=25, total=1000, kind="inverse_sqrt")
    assert a / b == pytest.approx(2.0)


def test_cosine_floor():
    assert lr_at(199, peak=1.0, warmup=0, total=200, kind="cosine", min_ratio=0.1) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(100, peak=1.0, warmup=0, total=200, kind="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
