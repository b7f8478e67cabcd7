"""Issue 25.1: each kind's router temperature follows the kind's own schedule during fine-tuning.

DyConv declares 30 -> 1; ODConv (converted at 1.0) and the kinds without a temperature declare
none, so fine-tuning keeps ODConv at the temperature its file records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import convert
import dynconv
from dynconv.layers import LAYERS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits import write_digits  # noqa: E402
from test_finetune_timm import dynconv as run_dynconv  # noqa: E402 - the installed script, as a subprocess


def _temperatures(model: nn.Module) -> list[float]:
    return [float(b) for m in model.modules() for n, b in m.named_buffers(recurse=False) if n == "temperature"]


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_each_kind_anneals_as_it_declares(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(LAYERS[kind].from_conv(nn.Conv2d(8, 8, 3, padding=1), experts=2))
    before = _temperatures(model)
    schedule = dynconv.TemperatureSchedule(model, steps=10)
    for _ in range(5):
        schedule.step()
    declared = LAYERS[kind].temperature_annealing
    if declared is None:
        assert _temperatures(model) == before and schedule.value() is None
    else:
        start, end = declared
        assert _temperatures(model) == [pytest.approx(start + (end - start) * 0.5)] * len(before)
    assert (kind == "dyconv") == (declared == (30.0, 1.0)) and (kind == "dyconv") == (declared is not None)


def test_odconv_fine_tunes_at_its_own_temperature(tmp_path) -> None:
    write_digits(tmp_path / "digits", size=32, limit=120)
    torch.manual_seed(0)
    base = convert.build_model("tf_mobilenetv3_small_minimal_100", num_classes=10)
    result = convert.convert_model(base, kind="odconv", experts=1, input_size=32)
    path = convert.save_checkpoint(result, tmp_path / "od.safetensors")
    assert set(_temperatures(result.model)) == {1.0}
    out = tmp_path / "od-ft.safetensors"
    args = ("--epochs", "1", "--batch-size", "16", "--max-steps", "3")
    done = run_dynconv("finetune", path, tmp_path / "digits", "-o", out, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "temperature: none anneals" in done.stdout
    epoch_line = next(line for line in done.stdout.splitlines() if line.startswith("epoch 1/1:"))
    assert "temperature" not in epoch_line
    assert set(_temperatures(convert.load_checkpoint(out))) == {1.0}


def test_the_help_says_which_kinds_anneal() -> None:
    shown = run_dynconv("finetune", "--help", cwd=ROOT)
    assert "DyConv: 30 -> 1" in shown.stdout and "ODConv" in shown.stdout
