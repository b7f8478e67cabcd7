"""``dynconv analyze`` (#15): routing statistics of converted and fine-tuned checkpoints on real images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import convert
from convert.analyze import _Accumulator
from convert.cli import app

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits import write_digits  # noqa: E402

runner = CliRunner()
FIGURES = {"routing_by_class.png", "entropy_by_depth.png", "expert_spread_by_depth.png", "class_ratio_by_depth.png"}


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("data") / "digits", size=32, limit=240)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, list[str]]:
    """A seeded ResNet-18 for the ten digits, converted to CondConv (K=4) but for layer4 (a smaller file), on disk."""
    torch.manual_seed(0)
    model = convert.build_model("resnet18", num_classes=10)
    result = convert.convert_model(model, experts=4, input_size=32, exclude=["layer4.*"])
    path = convert.save_checkpoint(result, tmp_path_factory.mktemp("ckpt") / "digits-condconv.safetensors")
    return path, [r.name for r in result.layers]


@pytest.fixture(scope="module")
def finetuned(converted, digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "ft.safetensors"
    args = [
        "--epochs",
        1,
        "--max-steps",
        4,
        "--batch-size",
        32,
        "--opt",
        "momentum",
        "--lr",
        0.05,
        "--router-lr-scale",
        10,
        "--calibrate-routing",  # from uniform routing, as converted: has it moved? (calibration: test_calibration.py)
        0,
    ]
    trained = run("finetune", converted[0], digits, "--output", out, *args)
    assert trained.exit_code == 0, trained.stderr
    return out


def test_right_after_conversion_the_routing_is_uniform_and_ignores_the_class(converted, digits) -> None:
    path, names = converted
    shown = run("analyze", path, digits, "--json", "--limit", 100, "--batch-size", 32)
    assert shown.exit_code == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["images"] == 100 and data["classes"] == [str(d) for d in range(10)]
    assert [s["name"] for s in data["layers"]] == names
    for stats in data["layers"]:
        assert stats["entropy"] == pytest.approx(1.0, abs=1e-9)
        assert stats["class_ratio"] == 0.0
        assert stats["top_share"] == pytest.approx([0.25] * 4)
        assert stats["mean_routing"] == pytest.approx([0.5] * 4)  # sigmoid(0) per expert
        assert 0.9 < stats["moved"] < 1.1  # the experts are as far apart as the conversion's noise put them


def test_after_fine_tuning_the_routing_has_moved_and_figures_are_written(finetuned, converted, digits, tmp_path):
    out = tmp_path / "analysis"
    shown = run("analyze", finetuned, digits, "--output", out, "--batch-size", 64, "--limit", 160)
    assert shown.exit_code == 0, shown.stderr
    assert "images/s" in shown.stdout and f"wrote {out / 'routing.json'}" in shown.stdout
    data = json.loads((out / "routing.json").read_text())
    assert [s["name"] for s in data["layers"]] == converted[1] and data["images"] == 160
    entropies = [s["entropy"] for s in data["layers"]]
    assert all(0.0 <= e <= 1.0 for e in entropies)
    assert min(entropies) < 1 - 1e-6  # the routers learned something in four steps
    assert max(s["class_ratio"] for s in data["layers"]) > 0
    for stats in data["layers"]:
        assert sum(stats["top_share"]) == pytest.approx(1.0)
        assert len(stats["class_means"]) == 10 and len(stats["class_means"][0]) == 4
    assert {p.name for p in out.glob("*.png")} == FIGURES
    for name in FIGURES:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) >= 200
    again = run("analyze", finetuned, digits, "--output", out)
    assert again.exit_code == 2 and "already holds an analysis" in again.stderr
    forced = run("analyze", finetuned, digits, "--output", out, "--force", "--layer", "layer3.*", "--limit", 20)
    assert forced.exit_code == 0, forced.stderr
    assert [s["name"] for s in json.loads((out / "routing.json").read_text())["layers"]] == [
        n for n in converted[1] if n.startswith("layer3.")
    ]


def test_bad_input_is_one_line_and_exit_2(converted, digits, tmp_path) -> None:
    path, _ = converted
    not_a_checkpoint = tmp_path / "notes.safetensors"
    not_a_checkpoint.write_text("hello")
    cases = [
        ((path, tmp_path / "missing"), "does not exist"),
        ((not_a_checkpoint, digits), "not a safetensors file"),
        ((tmp_path / "none.safetensors", digits), "does not exist"),
        ((path, digits, "--layer", "layer4.*"), "matches no dynamic layer"),
        ((path, digits, "--batch-size", 0), "--batch-size must be at least 1"),
    ]
    for args, message in cases:
        shown = run("analyze", *args)
        assert shown.exit_code == 2, (args, shown.stderr)
        assert message in shown.stderr and len(shown.stderr.strip().splitlines()) == 1, shown.stderr


def test_figures_without_matplotlib_name_the_extra(converted, digits, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    shown = run("analyze", converted[0], digits, "--output", tmp_path / "out")
    assert shown.exit_code == 2 and "dynconv[figures]" in shown.stderr
    assert not (tmp_path / "out").exists()


def test_statistics_of_per_channel_and_class_specific_routing() -> None:
    uniform = _Accumulator(experts=4, classes=2)
    uniform.add(torch.full((6, 4, 3), 0.25), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert uniform.entropy / uniform.count == pytest.approx(1.0)
    assert uniform.class_statistics(per_channel=True)[0] == 0.0
    one_hot = torch.zeros(4, 4, 3)
    one_hot[:2, 1] = 1  # class 0: expert 1 for every output channel
    one_hot[2:, 3] = 1  # class 1: expert 3
    decided = _Accumulator(experts=4, classes=2)
    decided.add(one_hot + 1e-3 * torch.rand(4, 4, 3), torch.tensor([0, 0, 1, 1]))
    assert decided.entropy / decided.count < 0.05
    assert (decided.top / decided.count).tolist() == pytest.approx([0, 0.5, 0, 0.5])
    ratio, means = decided.class_statistics(per_channel=True)
    assert ratio > 1e3 and len(means) == 2 and means[0][1] > 0.99 and means[1][3] > 0.99


def test_odconv_routing_is_read_from_its_kernel_attention(digits, tmp_path) -> None:
    """ODConv captures all four attentions side by side; analyze reads the K kernel-attention columns."""
    torch.manual_seed(0)
    model = convert.build_model("resnet18", num_classes=10)
    result = convert.convert_model(model, kind="odconv", experts=4, input_size=32, include=["layer1.*"])
    path = convert.save_checkpoint(result, tmp_path / "digits-odconv.safetensors")
    shown = run("analyze", path, digits, "--json", "--limit", 64, "--batch-size", 32)
    assert shown.exit_code == 0, shown.stderr
    layers = json.loads(shown.stdout)["layers"]
    assert [s["name"] for s in layers] == [r.name for r in result.layers] and len(layers) == 4
    for stats in layers:
        assert len(stats["mean_routing"]) == 4 and stats["entropy"] == pytest.approx(1.0, abs=1e-9)
        assert stats["top_share"] == pytest.approx([0.25] * 4) and stats["class_ratio"] == 0.0
