"""Deployment forms of the cheap kinds: DCD and ODConv 1x export with their static kernel a constant Conv weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import dynconv
from convert.export import export_onnx
from dynconv.core import record_strategies

SIZE = 32


def small_net(kind: str) -> nn.Sequential:
    """A 3x3 conv, a strided depthwise 3x3 and a 1x1, each converted to ``kind`` (ODConv: 1 expert), routers
    moved off zero so every dynamic part is live."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, 2, 1, groups=16), nn.Conv2d(16, 24, 1)]
    layer_cls = dynconv.DCDConv2d if kind == "dcd" else dynconv.ODConv2d
    layers = [layer_cls.from_conv(conv, 1, seed=i) for i, conv in enumerate(convs)]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers:
            for fc in layer.router.modules():
                if isinstance(fc, nn.Linear):
                    fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) / fc.in_features**0.5)
    return nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU6(), layers[2]).eval()


def constant_conv_weights(path: Path) -> list[np.ndarray]:
    """The weights of every Conv node whose weight input is an initializer (a constant the runtime pre-packs)."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return [inits[n.input[1]] for n in graph.node if n.op_type == "Conv" and n.input[1] in inits]


def holds_constant(weights: list[np.ndarray], kernel: torch.Tensor) -> bool:
    """Whether ``kernel`` is exactly one of ``weights`` (the exporter may keep the expert axis)."""
    target = kernel.detach().numpy()
    return any(w.size == target.size and np.array_equal(w.reshape(target.shape), target) for w in weights)


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("batch", [1, None])
def test_dcd_exports_its_static_kernel_and_both_factors_as_constant_convs(tmp_path, batch) -> None:
    """Every DCD layer's W0, Q and P are Conv initializers; only Lambda and Phi are computed; ORT equals PyTorch."""
    model = small_net("dcd")
    path = tmp_path / "dcd.onnx"
    result = export_onnx(model, path, batch=batch, input_shape=(3, SIZE, SIZE))
    assert result.strategies == {"decomposed": 3}
    weights = constant_conv_weights(path)
    for layer in (model[0], model[2], model[4]):
        assert holds_constant(weights, layer.weight[0]), "W0 is not a constant Conv weight"
    for layer in (model[0], model[4]):  # dense convs: Q and P run as thin 1x1 convs with constant weights
        assert holds_constant(weights, layer.q.reshape(layer.q.shape[0], -1, 1, 1))
        assert holds_constant(weights, layer.p.reshape(*layer.p.shape, 1, 1))
    x = torch.randn(batch or 2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    actual = run_onnx(path, x)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("batch", [1, None])
def test_odconv_1x_exports_its_1x1_kernel_as_a_constant_conv(tmp_path, batch) -> None:
    """ODConv 1x: channel attentions scale the maps; a 1x1 kernel (no taps) stays a constant Conv weight."""
    model = small_net("odconv")
    path = tmp_path / "od.onnx"
    result = export_onnx(model, path, batch=batch, input_shape=(3, SIZE, SIZE))
    assert result.strategies.get("static") == 1
    assert holds_constant(constant_conv_weights(path), model[4].weight[0])
    x = torch.randn(batch or 2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    actual = run_onnx(path, x)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_the_deployment_form_computes_what_the_per_sample_kernel_computes() -> None:
    """torch.export traces DCD's constant-kernel form, and it equals the reference per-sample loop."""
    model = small_net("dcd")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), record_strategies() as chosen:
        program = torch.export.export(model, (x,))
    assert chosen == ["decomposed"] * 3
    with torch.no_grad():
        exported = program.module()(x)
        for layer in (model[0], model[2], model[4]):
            layer.strategy = "loop"
        reference = model(x)
    assert (exported - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "groups"),
    [
        ((3, 3), (1, 1), (1, 1), 1),
        ((3, 3), (2, 2), (1, 1), 16),
        ((5, 5), (1, 1), (2, 2), 1),
        ((1, 3), (2, 1), (1, 1), 4),
    ],
)
def test_exported_im2col_is_a_one_hot_conv_equal_to_unfold(monkeypatch, kernel, stride, dilation, groups) -> None:
    from dynconv.core.kernels import im2col
    from dynconv.geometry import ConvGeometry

    geom = ConvGeometry(kernel, stride, dilation, (0, 0, 0, 0), groups)
    x = torch.randn(3, 16, 13, 11)
    eager = im2col(x, geom)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    exported = im2col(x, geom)
    assert torch.equal(exported, eager)
    assert torch.equal(eager, torch.nn.functional.unfold(x, kernel, dilation=dilation, stride=stride))


def test_a_dynamic_batch_export_forms_im2col_with_a_conv_not_gathers(tmp_path) -> None:
    """ODConv 1x's k x k layers take the im2col form at a dynamic batch: one constant Conv, no Gather chain."""
    model = small_net("odconv")
    result = export_onnx(model, tmp_path / "odconv.onnx", batch=None, input_shape=(3, SIZE, SIZE))
    assert result.strategies.get("unfold") == 2 and all(check.ok for check in result.checks)
    ops = [node.op_type for node in onnx.load(str(result.path)).graph.node]
    assert "Gather" not in ops and ops.count("Conv") >= 3  # the 1x1 layer, and one im2col Conv per k x k layer
    x = torch.randn(5, 3, SIZE, SIZE)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected, atol=1e-5)
