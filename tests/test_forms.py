"""One table of forms: a form registered once, with its capabilities, is seen by the core,
``strategy_scope``, the layers, ONNX export (and its metadata) and torch.compile."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from reference import per_sample_conv
from torch import nn

import convert
import dynconv
from dynconv.core import FORMS, Form, record_strategies, register_form, rules
from dynconv.core.kernels import NO_TERMS, add_bias, mix_bias, mix_kernels, pad_input, unpadded_output_size


def einsum_im2col(x, weight, routing, bias, geom, terms=NO_TERMS):
    """A throwaway form: im2col with one einsum per call (same result as ``unfold``)."""
    x = pad_input(x, geom)
    batch, groups = x.shape[0], geom.groups
    h_out, w_out = unpadded_output_size(x, geom)
    cols = F.unfold(x, geom.kernel, dilation=geom.dilation, stride=geom.stride)
    kernels = mix_kernels(weight, routing, terms).flatten(2)
    c_out = kernels.shape[1]
    out = torch.einsum(
        "bgok,bgkl->bgol",
        kernels.reshape(batch, groups, c_out // groups, -1),
        cols.reshape(batch, groups, -1, cols.shape[-1]),
    )
    return add_bias(out.reshape(batch, c_out, h_out, w_out), mix_bias(bias, routing))


@pytest.fixture
def einsum_form():
    form = register_form(Form("einsum", einsum_im2col, per_sample_kernels=True, batch_agnostic=True))
    yield form
    del FORMS[form.name]


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2))
    model[2] = dynconv.DyConv2d.from_conv(model[2], experts=3, seed=0)
    model[0] = dynconv.CondConv2d.from_conv(model[0], experts=2, seed=0)
    for layer in dynconv.dynamic_layers(model).values():
        for p in layer.router_parameters():
            nn.init.normal_(p, std=0.5)  # input-dependent routing
    return model.eval()


def test_every_view_of_the_table_sees_a_registered_form(einsum_form) -> None:
    assert "einsum" in dynconv.STRATEGIES and dynconv.STRATEGIES["einsum"] is einsum_im2col
    assert "einsum" in dynconv.EXPORTABLE_STRATEGIES
    geom = dynconv.geometry.ConvGeometry.build((3, 3), 1, 1, 1, 2)
    assert rules.applicable("einsum", 5, geom, modulated=True)
    x, w, r, b = torch.randn(5, 4, 7, 7), torch.randn(3, 6, 2, 3, 3), torch.rand(5, 3, 6), torch.randn(3, 6)
    out = dynconv.dynamic_conv2d(x, w, r, b, 1, 1, 1, 2, strategy="einsum")
    torch.testing.assert_close(out, per_sample_conv(x, w, r, b, 1, 1, 1, 2))
    model = small_model()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        with dynconv.strategy_scope("einsum"), record_strategies() as seen:
            scoped = model(x)
        assert seen == ["einsum", "einsum"]
        model[2].strategy = "einsum"  # the layers' own check reads the table too
        with record_strategies() as seen:
            model(x)
        assert seen[-1] == "einsum"
    torch.testing.assert_close(scoped, expected)


def test_an_unregistered_form_is_unknown_everywhere() -> None:
    assert "einsum" not in dynconv.STRATEGIES
    with pytest.raises(ValueError, match="unknown strategy"):
        with dynconv.strategy_scope("einsum"):
            pass
    with pytest.raises(ValueError, match="unknown strategy"):
        small_model()[0].strategy = "einsum"
    with pytest.raises(ValueError, match="already registered"):
        register_form(Form("unfold", einsum_im2col, per_sample_kernels=True, batch_agnostic=True))


def test_export_runs_and_records_a_registered_form(einsum_form, tmp_path) -> None:
    model = small_model()
    with dynconv.strategy_scope("einsum"):
        result = convert.export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 12, 12))
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["dynconv.strategies"]) == {"einsum": 2} == result.strategies
    assert meta["dynconv.batch"] == "dynamic"  # einsum is batch-agnostic: the batch axis stays free


def test_compile_traces_a_registered_form(einsum_form) -> None:
    model = small_model()
    model[2].strategy = "einsum"
    codes = []

    def backend(gm: torch.fx.GraphModule, _inputs) -> torch.fx.GraphModule:
        codes.append(gm.code)
        return gm

    torch._dynamo.reset()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        out = torch.compile(model, dynamic=True, backend=backend)(x)
        torch.testing.assert_close(out, model(x))
    assert any("einsum" in code for code in codes)
