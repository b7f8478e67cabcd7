"""``dynconv collapse`` / ``convert.collapse`` (issue 23, point 3): dynamic layers back into static convs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import convert
import dynconv
from convert.checkpoint import FORMAT_VERSION, read_metadata
from convert.collapse_kernels import collapsed_conv
from convert.verify import difference

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runner import run  # noqa: E402
from digits import write_digits  # noqa: E402

DYNCONV = Path(sys.executable).with_name("dynconv")
CONSTANT = "layer1.0.conv1"  # its router ignores the input: routing = sigmoid(bias)
LAYERS = ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]


def dynconv_cli(*args: object) -> subprocess.CompletedProcess:
    """The installed ``dynconv`` script, with this tree's code first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(DYNCONV), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def routed() -> nn.Module:
    """ResNet-18's layer1 as CondConv (K=3) with hand-set routers: three vary with the input, one is constant."""
    torch.manual_seed(0)
    base = convert.build_model("resnet18", num_classes=10)
    model = convert.convert_model(base, experts=3, input_size=32, include=["layer1.*"]).model
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in dynconv.dynamic_layers(model).items():
            fc = layer.router.fc
            fc.weight.copy_(
                torch.zeros_like(fc.weight) if name == CONSTANT else torch.randn(fc.weight.shape, generator=gen)
            )
            fc.bias.copy_(torch.tensor([1.0, -1.0, 0.5]))
    return model.eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def budget_zero(routed) -> convert.CollapseResult:
    return convert.collapse(routed, [images(8, 0), images(8, 1)], max_drop=0.0, time_layers=False)


@pytest.mark.parametrize("kind", ["condconv", "dyconv", "dynet", "dcd", "odconv"])
@pytest.mark.parametrize("groups", [1, 4])
def test_the_kernel_at_a_samples_routing_reproduces_the_layer_on_that_sample(kind: str, groups: int) -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    layer = dynconv.layer_class(kind).from_conv(conv, experts=3).eval()
    with torch.no_grad():
        for p in layer.router_parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad(), dynconv.capture_routing(layer) as routing:
        expected = layer(x)
    with torch.no_grad():
        _, _, ok = difference(expected, collapsed_conv(layer, routing[""][0])(x))
    assert ok


def test_a_layer_with_constant_routing_collapses_exactly_and_budget_zero_keeps_every_other(routed, budget_zero):
    plans = {p.name: p for p in budget_zero.layers}
    assert list(plans) == LAYERS
    assert budget_zero.collapsed == [CONSTANT] and plans[CONSTANT].spread == 0.0
    assert all(plans[n].error > 0.01 and not plans[n].collapsed for n in LAYERS[1:])  # each changes the output
    collapsed = budget_zero.model.get_submodule(CONSTANT)
    assert type(collapsed) is nn.Conv2d
    x = images(4, 7)  # unseen inputs: constant routing makes the collapse exact for every input
    with torch.no_grad():
        _, _, ok = difference(routed(x), budget_zero.model(x))
    assert ok
    assert isinstance(routed.get_submodule(CONSTANT), dynconv.CondConv2d)  # the input model is left alone


def test_keep_n_keeps_the_layers_whose_routing_varies_most(routed) -> None:
    result = convert.collapse(routed, [images(8, 0)], keep=2, metric="output")
    assert all(p.saved_ms is not None for p in result.layers)  # timed on each layer's own input (not asserted on)
    spread = {p.name: p.spread for p in result.layers}
    assert sorted(result.kept) == sorted(sorted(spread, key=spread.get)[-2:])
    assert len(dynconv.dynamic_layers(result.model)) == 2
    with pytest.raises(convert.UserError, match="not both"):
        convert.collapse(routed, [images(8, 0)], keep=2, max_drop=0.1)
    with pytest.raises(convert.UserError, match="labelled"):
        convert.collapse(routed, [images(8, 0)], max_drop=0.1, metric="accuracy")


def test_the_collapsed_checkpoint_round_trips_and_records_its_collapsed_layers(budget_zero, tmp_path) -> None:
    path = convert.save_checkpoint(budget_zero.model, tmp_path / "collapsed.safetensors")
    meta = read_metadata(path)
    assert meta["collapsed"] == [CONSTANT] and meta["format_version"] == FORMAT_VERSION
    assert [r["names"] for r in meta["layers"]] == [[n] for n in LAYERS[1:]]
    loaded = convert.load_checkpoint(path)  # rebuilt by name, digest checked
    assert type(loaded.get_submodule(CONSTANT)) is nn.Conv2d
    assert list(dynconv.dynamic_layers(loaded)) == LAYERS[1:]
    x = images(3, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), budget_zero.model(x))
    again = convert.save_checkpoint(loaded, tmp_path / "again.safetensors")
    assert read_metadata(again)["digest"] == meta["digest"]
    shown = run("inspect", path)
    assert shown.exit_code == 0 and f"1 static again: {CONSTANT}" in shown.stdout, shown.stderr
    verified = run("verify", path)
    assert verified.exit_code == 0 and "3 dynamic layers, 1 collapsed" in verified.stdout, verified.stderr


def test_a_fully_collapsed_model_is_the_original_architecture(routed, tmp_path) -> None:
    result = convert.collapse(routed, [images(8, 0)], keep=0, time_layers=False)
    assert result.kept == [] and result.collapsed == LAYERS
    loaded = convert.load_checkpoint(convert.save_checkpoint(result.model, tmp_path / "all.safetensors"))
    base = convert.build_model("resnet18", num_classes=10)
    assert not dynconv.dynamic_layers(loaded)
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}


def test_a_partly_collapsed_model_exports_and_runs_in_onnx_runtime_as_in_pytorch(budget_zero, tmp_path) -> None:
    import onnxruntime as ort

    exported = convert.export_onnx(budget_zero.model, tmp_path / "m.onnx", batch=1, input_shape=(3, 32, 32))
    x = images(1, 5)
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        _, _, ok = difference(budget_zero.model(x), torch.from_numpy(np.asarray(got)))
    assert ok


@pytest.fixture(scope="module")
def saved(routed, tmp_path_factory) -> Path:
    return convert.save_checkpoint(routed, tmp_path_factory.mktemp("ckpt") / "routed.safetensors")


def test_the_command_collapses_within_the_accuracy_budget_on_an_image_folder(saved, tmp_path) -> None:
    digits = write_digits(tmp_path / "digits", size=32, limit=30)
    out = tmp_path / "out.safetensors"
    done = dynconv_cli("collapse", saved, digits, "-o", out, "--max-drop", 0, "--no-timing", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["metric"] == "accuracy" and report["images"] == 30
    assert report["accuracy_after"] >= report["accuracy_before"]
    assert CONSTANT in report["collapsed"] and read_metadata(out)["collapsed"] == report["collapsed"]


def test_the_command_refuses_bad_input_with_one_sentence_and_exit_2(saved, tmp_path) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    cases = [
        (["--max-drop", 0.2, "-o", tmp_path / "a.safetensors"], "needs DATA"),
        (["-o", out, "--keep", 1], "already exists"),
        (["--metric", "output", "--max-drop", 0.2, "--keep", 1, "-o", tmp_path / "b.safetensors"], "not both"),
    ]
    for args, message in cases:
        done = dynconv_cli("collapse", saved, *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"keep me"
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()
