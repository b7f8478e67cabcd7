"""Deployment: BatchNorm folding, ONNX export with a dynamic batch, torch.compile, channels_last."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import convert
import dynconv
from convert.cli import app
from convert.export import ExportError, export_onnx
from convert.folding import FoldError, find_conv_bn_pairs, fold_batchnorm
from convert.verify import compare, signal_preserving_init

TESTS = Path(__file__).resolve().parent
KINDS = list(dynconv.LAYERS)
runner = CliRunner()


def trained_like(name: str) -> nn.Module:
    """A seeded torchvision model whose BatchNorms look trained (non-trivial statistics and affine)."""
    gen = torch.Generator().manual_seed(1)
    model = signal_preserving_init(torchvision.models.get_model(name))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 0.6 - 0.3)
    return model.eval()


def converted(name: str, kind: str) -> nn.Module:
    """``name`` converted to ``kind`` with routers moved off zero, so routing depends on the input."""
    model = convert.convert_model(trained_like(name), kind=kind, experts=4, input_size=64).model
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in dynconv.dynamic_layers(model).values():
            for fc in layer.router.modules():
                if isinstance(fc, nn.Linear):  # logits of order one, away from sigmoid/softmax saturation
                    fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) / fc.in_features**0.5)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], nn.Module]:
    return {(n, k): converted(n, k) for n in ("resnet18", "mobilenet_v2") for k in KINDS}


def batch(n: int = 3, size: int = 64) -> torch.Tensor:
    """Samples with different means, so even the first router sees different pooled features."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))
    return x + torch.linspace(-1, 1, n).view(n, 1, 1, 1)


def routing_varies(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether most layers route the first two samples differently (else the checks prove little)."""
    with dynconv.capture_routing(model) as routes, torch.no_grad():
        model(x)
    spread = torch.tensor([float((r[0] - r[1]).abs().max()) for r in routes.values()])
    return len(routes) > 0 and spread.median().item() > 1e-3


# ------------------------------------------------------------------- BatchNorm folding


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_fold_batchnorm_is_exact_and_removes_every_norm(models, name, kind) -> None:
    model = models[(name, kind)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = batch()
    assert routing_varies(model, x)
    result = fold_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(result.folded) == len(norms) and not result.skipped
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    check = compare(model, result.model, x)
    assert check.ok, check
    assert {p.conv for p in result.folded if p.kind == kind} == set(dynconv.dynamic_layers(model))
    for name_, layer in dynconv.dynamic_layers(result.model).items():
        # sigmoid routing does not sum to one: the BatchNorm shift must live outside the experts
        assert (layer.static_bias is not None) == (kind == "condconv"), name_
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the input model changed"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_fold_into_one_layer_matches_conv_then_norm(kind, bias) -> None:
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=bias)
    bn = trained_like_norm(8)
    layer = dynconv.layer_class(kind).from_conv(conv, experts=3)
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(4, 6, 9, 9)
    expected = bn(layer(x))
    dynconv.fold_batchnorm_(layer, bn)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    if kind == "condconv":  # the routing weights of different samples sum to different totals
        totals = layer.route(x).sum(1)
        assert (totals.max() - totals.min()) > 1e-3


def trained_like_norm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(-1.5, 1.5)  # negative scales too
        bn.bias.uniform_(-1, 1)
    return bn


def test_weight_standardised_layer_refuses_to_fold() -> None:
    from dynconv.standardization import WeightStandardization

    layer = dynconv.DyConv2d.from_conv(nn.Conv2d(4, 4, 3), standardize=WeightStandardization())
    weight = layer.weight.clone()
    with pytest.raises(ValueError, match="weight-standardised"):
        dynconv.fold_batchnorm_(layer, trained_like_norm(4))
    assert torch.equal(layer.weight, weight)


def test_timm_batchnorm_act_folds_and_keeps_its_activation() -> None:
    """timm's BatchNormAct2d (BN, drop, act in one module) around TF-'same' convs."""
    import timm

    base = signal_preserving_init(timm.create_model("tf_efficientnet_b0")).eval()
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
                m.running_mean.uniform_(-0.5, 0.5)
    model = convert.convert_model(base, kind="dyconv", experts=2, input_size=64).model
    result = fold_batchnorm(model)
    assert len(result.folded) == 49 and not result.skipped
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert isinstance(result.model.bn1, nn.Sequential) and isinstance(result.model.bn1[1], nn.SiLU)
    assert compare(model, result.model, batch(2)).ok


class Branchy(nn.Module):
    """conv1's output feeds its BatchNorm and a skip; bn2 follows a pool, not a conv; conv3 -> bn3 folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        y = self.bn1(y) + y
        y = self.bn2(self.pool(y))
        return self.bn3(self.conv3(y))


def test_pairs_come_from_the_graph_not_from_names() -> None:
    model = convert.convert_model(Branchy().eval(), kind="dyconv", experts=2, input_size=16).model
    pairs, skipped = find_conv_bn_pairs(model)
    assert pairs == [("conv3", "bn3")]
    reasons = {s.name: s.reason for s in skipped}
    assert "also used elsewhere" in reasons["bn1"]
    assert "not the output of a conv" in reasons["bn2"]
    result = fold_batchnorm(model)
    assert isinstance(result.model.bn3, nn.Identity) and isinstance(result.model.bn1, nn.BatchNorm2d)
    assert compare(model, result.model, torch.randn(2, 3, 16, 16)).ok


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on values: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.conv(x)


def test_untraceable_model_is_refused_with_a_reason() -> None:
    with pytest.raises(FoldError, match=r"does not trace with torch\.fx"):
        fold_batchnorm(DataDependent())


def test_a_folded_model_cannot_be_saved_as_a_checkpoint(models, tmp_path) -> None:
    folded = fold_batchnorm(models[("resnet18", "dyconv")]).model
    with pytest.raises(convert.CheckpointError, match="BatchNorm folded"):
        convert.save_checkpoint(folded, tmp_path / "f.safetensors")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------- ONNX export


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize(("name", "kind", "fold"), [("resnet18", "condconv", True), ("mobilenet_v2", "dynet", False)])
def test_onnx_export_has_a_dynamic_batch(models, tmp_path, name, kind, fold) -> None:
    model = models[(name, kind)]
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, input_shape=(3, 64, 64), fold_bn=fold)
    assert [c.batch for c in result.checks] == [1, 3] and all(c.ok for c in result.checks)
    assert (result.folded is not None) == fold
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "staging files were left behind"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # symbolic, not baked in
    assert session.get_modelmeta().custom_metadata_map["dynconv.dynamic_layers"] == str(
        len(dynconv.dynamic_layers(model))
    )
    for n in (1, 5):  # checked independently of the exporter's own check, at another batch size too
        x = batch(n)
        with torch.no_grad():
            expected = model(x)
        assert compare_arrays(run_onnx(path, x), expected)


def compare_arrays(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and bool(
        (actual - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-5
    )


def test_the_grouped_fold_cannot_export_a_dynamic_batch(tmp_path) -> None:
    """The premise: forcing the batch-folding strategy breaks export, and nothing is written."""
    model = nn.Sequential(dynconv.CondConv2d.from_conv(nn.Conv2d(3, 4, 3), experts=2)).eval()
    model[0].strategy = "grouped"
    with pytest.raises(ExportError, match="does not run in ONNX Runtime at batch 1"):
        export_onnx(model, tmp_path / "g.onnx", input_shape=(3, 8, 8))
    assert not list(tmp_path.iterdir())


def test_export_refuses_an_existing_output_and_keeps_it(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        export_onnx(nn.Conv2d(3, 3, 1), path, input_shape=(3, 8, 8))
    assert path.read_bytes() == b"keep me"


def test_export_check_failure_writes_nothing(tmp_path) -> None:
    sys.path.insert(0, str(TESTS))
    from cli_models import noisy_net

    path = tmp_path / "noisy.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(noisy_net().eval(), path, input_shape=(3, 16, 16), overwrite=True)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["noisy.onnx"]


# ------------------------------------------------------------------- the CLI


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("deploy")
    weights = folder / "resnet18.pth"
    torch.save(trained_like("resnet18").state_dict(), weights)
    path = folder / "r18.safetensors"
    result = cli("convert", "resnet18", "--kind", "dyconv", "--weights", weights, "-o", path, "--input-size", 64)
    assert result.exit_code == 0, result.stderr
    return path


def test_cli_export_fold_bn_json(checkpoint, tmp_path) -> None:
    import json

    path = tmp_path / "m.onnx"
    result = cli("export", checkpoint, "--onnx", path, "--fold-bn", "--batch", 1, "--batch", 4, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [c["batch"] for c in report["checks"]] == [1, 4] and all(c["ok"] for c in report["checks"])
    assert len(report["folded_batchnorm"]) == 20 and report["input_shape"] == ["batch", 3, 64, 64]
    loaded = convert.load_checkpoint(checkpoint)
    x = batch(2)
    with torch.no_grad():
        assert compare_arrays(run_onnx(path, x), loaded(x))
    again = cli("export", checkpoint, "--onnx", path)
    assert again.exit_code == 2 and "already exists; pass --force" in again.stderr
    table = cli("export", checkpoint, "--onnx", path, "--force")
    assert table.exit_code == 0 and "onnxruntime, batch 3" in table.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--onnx", "out.txt"], "should end in .onnx"),
        (["--onnx", "missing/out.onnx"], "folder missing does not exist"),
        (["--onnx", "out.onnx", "--batch", 0], "must be positive"),
    ],
)
def test_cli_export_user_errors(checkpoint, tmp_path, args, message) -> None:
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = cli("export", checkpoint, *args)
    finally:
        os.chdir(old)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not list(tmp_path.iterdir())


def test_cli_export_check_failure_exits_1(tmp_path) -> None:
    path = tmp_path / "noisy.safetensors"
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "convert.cli"]
    made = subprocess.run(
        [*cmd, "convert", "cli_models:noisy_net", "--no-verify", "-o", str(path), "--input-size", "16"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    result = subprocess.run(
        [*cmd, "export", path, "--onnx", tmp_path / "n.onnx", "--model", "cli_models:noisy_net"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "differs from PyTorch" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "n.onnx").exists()


# ------------------------------------------------------------------- compile, channels_last


@pytest.mark.parametrize(("name", "kind"), [("resnet18", "dyconv"), ("mobilenet_v2", "condconv")])
def test_torch_compile_gives_the_same_outputs(models, name, kind) -> None:
    model = models[(name, kind)]
    compiled = torch.compile(model)  # one batch size: one compilation (a minute on 2 cores)
    x = batch(3)
    with torch.no_grad():
        assert compare_arrays(compiled(x), model(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_channels_last_gives_the_same_outputs(models, name, kind) -> None:
    import copy

    model = models[(name, kind)]
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = batch(4)
    with torch.no_grad():
        expected = model(x)
        actual = last(x.contiguous(memory_format=torch.channels_last))
    assert compare_arrays(actual, expected)
    assert all(layer.weight.is_contiguous() for layer in dynconv.dynamic_layers(last).values())
