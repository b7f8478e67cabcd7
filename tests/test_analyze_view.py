"""What ``dynconv analyze`` shows: a verdict per layer from measured statistics, figures on fixed axes,
and a table whose layer names stay whole at any terminal width (#25, point 3)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import convert
from convert import analyze as routing
from convert.cli.analyze import analysis_rows
from convert.figures import HEATMAP_MIN_RANGE, entropy_figure, heatmap_figure, spread_figure, write_figures

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits import write_digits  # noqa: E402

BLOCK = "encoder.stage1_residual_block0"
#: What each converted conv's router is forced to, and the verdict that routing must get.
FORCED = {
    f"{BLOCK}.0": ("zeroed", routing.UNIFORM),
    f"{BLOCK}.2": ("input", routing.INPUT_DEPENDENT),
    f"{BLOCK}.4": ("one expert", routing.COLLAPSED),
    f"{BLOCK}.6": ("fixed", routing.FIXED_MIX),
    f"{BLOCK}.8": ("off", routing.OFF),
}


class LongNames(nn.Module):
    """A stem and five 3x3 convs under a long block name (the stem stays static)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        layers: list[nn.Module] = []
        for _ in range(5):
            layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
        self.encoder = nn.ModuleDict({"stage1_residual_block0": nn.Sequential(*layers[:-1])})
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder["stage1_residual_block0"](torch.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def force(layer: nn.Module, how: str, pooled: torch.Tensor) -> None:
    """Set a CondConv router (``sigmoid(fc(GAP(x)))``) so its routing is what ``how`` names;
    ``pooled`` is the layer's pooled input over the images ``[N, C_in]``."""
    fc = layer.router.fc
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.zero_()
        if how == "input":  # logits centred on the images' mean, 2 apart per standard deviation
            weight = torch.randn(fc.weight.shape, generator=torch.Generator().manual_seed(1))
            logits = pooled @ weight.T
            weight *= 2 / logits.std(0).clamp_min(1e-8)[:, None]
            fc.weight.copy_(weight)
            fc.bias.copy_(-(pooled.mean(0) @ weight.T))
        elif how == "one expert":
            fc.bias.copy_(torch.tensor([8.0, -8.0, -8.0, -8.0]))
        elif how == "fixed":  # expert 0 favoured the same way for every image
            fc.bias.copy_(torch.tensor([1.5, 0.0, 0.0, 0.0]))
        elif how == "off":  # sigmoid saturated at 0 for every expert: no kernel at all
            fc.bias.fill_(-200.0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("data") / "digits", size=16, limit=60)


@pytest.fixture(scope="module")
def forced(tmp_path_factory, digits) -> Path:
    """A converted checkpoint (CondConv, K=4) whose four layers' routers are forced as :data:`FORCED` says."""
    torch.manual_seed(0)
    result = convert.convert_model(LongNames(), experts=4, input_size=16)
    assert [r.name for r in result.layers] == list(FORCED)
    images = torch.stack([image for image, _ in routing.analysis_dataset(digits, 16, None)[0]])
    inputs: dict[str, torch.Tensor] = {}

    def record(name: str) -> object:
        return lambda module, args: inputs.update({name: args[0].mean((2, 3))})  # returns None: input unchanged

    hooks = [result.model.get_submodule(name).register_forward_pre_hook(record(name)) for name in FORCED]
    with torch.no_grad():
        result.model.eval()(images)
    for hook in hooks:
        hook.remove()
    for name, (how, _) in FORCED.items():
        force(result.model.get_submodule(name), how, inputs[name])
    return convert.save_checkpoint(result, tmp_path_factory.mktemp("ckpt") / "forced.safetensors")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> tuple[Path, list[str]]:
    """A seeded ResNet-18 for ten classes, its first two stages converted (CondConv, K=4), on disk."""
    torch.manual_seed(0)
    model = convert.build_model("resnet18", num_classes=10)
    result = convert.convert_model(model, input_size=32, include=["layer1.*", "layer2.*"])
    path = convert.save_checkpoint(result, tmp_path_factory.mktemp("ckpt") / "resnet18-condconv.safetensors")
    return path, [r.name for r in result.layers]


@pytest.fixture(scope="module")
def analysis(forced, digits) -> routing.Analysis:
    return routing.analyze(forced, digits, model=LongNames(), batch_size=32)


def test_each_forced_routing_gets_its_verdict(analysis) -> None:
    assert {s.name: s.verdict for s in analysis.layers} == {name: v for name, (_, v) in FORCED.items()}
    uniform, varied, collapsed, fixed, off = (analysis.layer(name) for name in FORCED)
    assert uniform.margin == pytest.approx(0.0, abs=1e-9) and uniform.variation == pytest.approx(0.0, abs=1e-6)
    assert varied.variation >= routing.UNIFORM_BELOW and collapsed.top_weight >= routing.COLLAPSED_FROM
    assert fixed.margin >= routing.UNIFORM_BELOW and fixed.variation < 1e-6
    assert off.top_weight == 0.0 and off.margin == 0.0  # not read as uniform, nor as below uniform
    data = analysis.to_json()
    assert [entry["verdict"] for entry in data["layers"]] == [v for _, v in FORCED.values()]
    assert "1 uniform, 1 input-dependent, 1 fixed mix, 1 collapsed to one expert, 1 off" in data["summary"]


def test_uniform_routing_names_no_top_expert(analysis) -> None:
    rows = {row[0]: row for row in analysis_rows(analysis)}
    assert rows[f"{BLOCK}.0"][5] == "none (uniform)" and rows[f"{BLOCK}.0"][-1] == routing.UNIFORM
    assert rows[f"{BLOCK}.4"][5] == "e0 100%"  # a real winner is still named


def test_figures_have_fixed_axes_and_one_colour_scale(analysis, tmp_path) -> None:
    layers = analysis.layers
    assert entropy_figure(layers).axes[0].get_ylim() == (0.0, 1.05)
    spread = spread_figure(layers).axes[0]
    assert spread.get_ylim()[0] == 0.0 and spread.get_yscale() == "linear"
    reference = [line for line in spread.get_lines() if "noise level" in line.get_label()]
    assert len(reference) == 1 and list(reference[0].get_ydata()) == [s.spread_at_conversion for s in layers]
    heatmap = heatmap_figure(analysis, layers)
    images = [image for axes in heatmap.axes for image in axes.get_images()]
    assert len(images) == len(layers) and len({image.get_clim() for image in images}) == 1
    low, high = images[0].get_clim()
    assert low == -high and high >= HEATMAP_MIN_RANGE
    written = write_figures(analysis, tmp_path)
    assert {p.name for p in written} == set(routing_figures())
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def routing_figures() -> list[str]:
    from convert import figures

    return [figures.HEATMAP, figures.ENTROPY, figures.SPREAD, figures.CLASS_RATIO]


@pytest.mark.parametrize("columns", [60, 80, 100, 160])
def test_analyze_table_keeps_every_layer_name_whole(resnet, digits, columns: int) -> None:
    path, names = resnet
    exe = shutil.which("dynconv") or str(Path(sys.executable).parent / "dynconv")
    assert Path(exe).exists(), "the dynconv console script is not installed"
    path_var = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path_var, "COLUMNS": str(columns), "OMP_NUM_THREADS": "2"}
    args = [exe, "analyze", str(path), str(digits), "--limit", "20", "--batch-size", "20"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("entropy: 1 = uniform")[0]
    assert max(len(line) for line in table.splitlines()) <= columns
    cells = [cell.strip() for line in table.splitlines() for cell in line.split("│")]
    for name in names:
        assert name in cells, f"{name} is not whole at {columns} columns:\n{table}"
    if columns >= 160:  # fresh conversion: uniform routing, so no expert is named the top one
        assert "none (uniform)" in cells and "e0 100%" not in done.stdout
