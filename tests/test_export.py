"""Deployment: ONNX export with a dynamic batch (API and CLI), torch.compile, channels_last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from deploy_models import KINDS, batch, compare_arrays, converted_models, trained_like
from torch import nn
from typer.testing import CliRunner

import convert
import dynconv
from convert.cli import app
from convert.errors import OutputPathError
from convert.export import ExportError, export_onnx
from dynconv.core.rules import fixed_batch_form

TESTS = Path(__file__).resolve().parent
runner = CliRunner()


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], nn.Module]:
    return converted_models()


# ------------------------------------------------------------------- ONNX export


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize(
    ("name", "kind", "fold"),
    [("resnet18", "condconv", True), pytest.param("mobilenet_v2", "dynet", False, marks=pytest.mark.slow)],  # ~1 min
)
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


def mixed_net() -> nn.Module:
    """A small net with every kind of conv the forms tell apart: k x k, 1x1, depthwise, strided."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    recipe = {"rules": [{"match": {"name": "0"}, "skip": False}]}
    model = convert.convert_model(net.eval(), recipe, kind="dyconv", input_size=32).model.eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in dynconv.dynamic_layers(model).values():
            layer.router.fc2.weight.copy_(torch.randn(layer.router.fc2.weight.shape, generator=gen))
    return model


@pytest.mark.parametrize(("size", "form"), [(1, "single"), (3, "grouped")])
def test_onnx_export_for_a_fixed_batch_uses_the_form_for_it(tmp_path, size, form) -> None:
    """Batch 1: one Conv with the mixed kernel as a computed weight (MatMul for 1x1); larger: the batch in groups."""
    model = mixed_net()
    path = tmp_path / "fixed.onnx"
    result = export_onnx(model, path, batch=size, input_shape=(3, 32, 32))
    layers = dynconv.dynamic_layers(model).values()
    expected = dict(Counter(fixed_batch_form(layer, size) for layer in layers))
    assert result.batch == size and result.strategies == expected and form in expected
    assert expected == ({"single": 3, "matmul": 1} if size == 1 else {"grouped": 4})
    assert all(layer.strategy is None for layer in layers), "the export left a layer pinned to a form"
    assert [c.batch for c in result.checks] == [size] and all(c.ok for c in result.checks)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == size
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["dynconv.batch"] == str(size) and json.loads(meta["dynconv.strategies"]) == expected
    x = batch(size, 32)
    with torch.no_grad():
        assert compare_arrays(run_onnx(path, x), model(x))
    with pytest.raises(convert.UserError, match="runs only at that batch"):
        export_onnx(model, tmp_path / "other.onnx", batch=size, check_batches=(size + 1,), input_shape=(3, 32, 32))


def test_a_dynamic_export_records_its_batch_agnostic_forms(tmp_path) -> None:
    model = mixed_net()
    result = export_onnx(model, tmp_path / "d.onnx", input_shape=(3, 32, 32))
    assert result.batch is None and result.strategies == {"matmul": 1, "output": 1, "unfold": 2}
    meta = ort.InferenceSession(str(tmp_path / "d.onnx")).get_modelmeta().custom_metadata_map
    assert meta["dynconv.batch"] == "dynamic" and json.loads(meta["dynconv.strategies"]) == result.strategies


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
    with pytest.raises(OutputPathError, match="already exists"):
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
    assert "(any batch)" in table.stdout


def test_cli_export_batch_size_prints_and_records_its_form(checkpoint, tmp_path) -> None:

    path = tmp_path / "b2.onnx"
    result = cli("export", checkpoint, "--onnx", path, "--batch-size", 1)
    assert result.exit_code == 0, result.stderr
    assert "[1, 3, 64, 64]" in result.stdout and "matmul 3, single 16 (this batch only)" in result.stdout, result.stdout
    assert "onnxruntime, batch 1" in result.stdout and "batch 3" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--onnx", "out.txt"], "should end in .onnx"),
        (["--onnx", "missing/out.onnx"], "folder missing does not exist"),
        (["--onnx", "out.onnx", "--batch", 0], "must be positive"),
        (["--onnx", "out.onnx", "--batch-size", 0], "must be positive"),
        (["--onnx", "out.onnx", "--batch-size", 2, "--batch", 3], "runs only at that batch"),
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


@pytest.mark.parametrize(
    ("name", "kind"), [("resnet18", "dyconv"), pytest.param("mobilenet_v2", "condconv", marks=pytest.mark.slow)]
)
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
