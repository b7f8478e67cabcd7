"""Routing that learns: fine-tuning a freshly converted model makes its routing depend on the input.

At conversion the experts differ only by the zero-sum noise and a softmax router's gradient
is proportional to it; with the defaults (noise 0.1, softmax routers at 30x the learning rate under
SGD) a few dozen steps on real digits move the routing measurably off uniform (``dynconv
analyze``'s entropy falls, its between-class ratio rises), where the old init left the
entropy within 1e-8 of uniform. The conversion stays exact (tests/test_layers.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from routing_learns import digits, fine_tune, pretrained


@pytest.fixture(scope="module")
def task():
    images, labels = digits()
    return pretrained(images, labels), images[:600], labels[:600]


# DyNet: a softmax router at temperature 1 (DyConv starts at 30, flat for these 30 steps; CondConv keeps 1x)
@pytest.mark.parametrize("kind", ["dynet"])
def test_fine_tuning_makes_the_routing_depend_on_the_input(task, kind: str) -> None:
    static, images, labels = task
    tuned = fine_tune(static, kind, images, labels, 30, init="default")
    assert tuned["entropy"] == pytest.approx(1.0, abs=1e-9) and tuned["ratio"] == 0  # uniform at conversion
    assert 1 - tuned["entropy_after"] > 1e-4 and tuned["ratio_after"] > 0.5
    old = fine_tune(static, kind, images, labels, 30, init="old")
    assert 1 - tuned["entropy_after"] > 100 * (1 - old["entropy_after"])
