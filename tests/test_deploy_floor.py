"""The deploy benchmark's floor (benchmarks/deploy_floor.py): the extra work it times in ONNX Runtime is the
work it times in eager PyTorch, for every kind, and the floor table reads each path against its own floor."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from deploy import floor_lines, session
from deploy_floor import extra_work

import convert
import dynconv

SIZE = 32
#: (kind, experts): every branch of the extra work (mixing, per-channel routing, DCD's two forms, ODConv 1x and 4x).
KINDS = [("condconv", 4), ("dynet", 4), ("dcd", None), ("odconv", 1), ("odconv", 4)]


def small_net() -> nn.Module:
    """A stem, a 3x3, a depthwise 3x3 at stride 2 and a 1x1: the conv shapes the kinds treat differently."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False),
        nn.ReLU(),
        nn.Conv2d(16, 24, 1),
    ).eval()


def converted(kind: str, experts: int | None) -> nn.Module:
    """``small_net`` converted to ``kind`` with every router's layers random (routing depends on the input)."""
    options = {} if experts is None else {"experts": experts}
    model = convert.convert_model(small_net(), kind=kind, input_size=SIZE, **options).model.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize(("kind", "experts"), KINDS)
def test_the_exported_extra_work_computes_what_the_eager_one_computes(
    tmp_path: Path, kind: str, experts: int | None
) -> None:
    model = converted(kind, experts)
    works, maps = extra_work(model, SIZE)
    assert len(maps) == 2 * len(dynconv.dynamic_layers(model)) >= 6  # every converted layer's input and output
    names = [f"map{i}" for i in range(len(maps))]
    feed = {name: m.numpy() for name, m in zip(names, maps, strict=True)}
    for name, work in works.items():
        with torch.no_grad():
            expected = work(*maps)
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(work, maps, dynamo=True, input_names=names).save(path)
        actual = session(path).run(None, feed)
        assert len(actual) == len(expected) >= 3, name  # at least one result per layer: no work was left out
        for got, want in zip(actual, expected, strict=True):
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    # the extra work holds the routing and more: the maps or kernels the kind computes from it
    assert sum(t.numel() for t in works["extra"](*maps)) > sum(t.numel() for t in works["routing"](*maps))


def test_the_floor_table_reads_each_path_against_its_own_floor() -> None:
    ratios = {("ort fixed", 1, "m", "dcd"): 3.0, ("eager", 1, "m", "dcd"): 2.0}
    floors = [  # (model, kind, MB, MB, MACs, ORT static, extra, routing ms, eager static, extra, routing ms)
        ("m", "dcd", 8.0, 16.0, 0.07, 10.0, 15.0, 2.0, 20.0, 10.0, 5.0),
        ("m", "dcd", 8.0, 16.0, 0.07, 10.0, 5.0, 1.0, None, None, None),  # eager not timed
    ]
    lines = floor_lines(floors, ratios)
    rows = [line for line in lines if line.startswith("| m |")]
    assert rows[0] == "| m | dcd | 8.0 | 16.0 | +7.0% | 15.00 | +20% | 2.50× | 3.00× | 10.00 | +25% | 1.50× | 2.00× |"
    assert rows[1] == "| m | dcd | 8.0 | 16.0 | +7.0% | 5.00 | +10% | 1.50× | 3.00× |  |  |  |  |"
