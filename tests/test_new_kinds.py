"""DCD and ODConv: exact conversion for every conv option, the formulas per sample, training, deployment."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from deploy_models import trained_batchnorms_
from reference import close_enough
from test_layers import CONV_GRID, GRID_IDS, assert_same_function, make_conv
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2dSame
from timm.layers.conv2d_same import conv2d_same
from torch import nn
from typer.testing import CliRunner

import convert
import dynconv
from convert.cli import app
from convert.folding import fold_batchnorm
from dynconv import DCDConv2d, ODConv2d

TESTS = Path(__file__).resolve().parent
# (kind, experts): DCD has one static kernel; ODConv "1x" and with four experts
VARIANTS = [("dcd", 1), ("odconv", 1), ("odconv", 4)]
VARIANT_IDS = ["dcd", "odconv1", "odconv4"]


def build(kind: str, conv: nn.Conv2d, experts: int, **options) -> dynconv.DynamicConv2d:
    if isinstance(conv, Conv2dSame):
        options["padding"] = dynconv.TF_SAME
    return dynconv.layer_class(kind).from_conv(conv, experts=experts, seed=3, **options)


def randomize_router(layer: nn.Module, seed: int = 0) -> None:
    """Routers off zero (heads and biases), so every attention depends on the input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fc in layer.router.modules():
            if isinstance(fc, nn.Linear):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) / fc.in_features**0.5)
                fc.bias.copy_(torch.randn(fc.bias.shape, generator=gen) * 0.3)


def conv_with(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What ``conv`` computes with another kernel: its own padding, padding mode and TF 'same'."""
    if isinstance(conv, Conv2dSame):
        return conv2d_same(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return conv._conv_forward(x, weight, bias)


def dcd_reference(layer: DCDConv2d, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Per sample: one conv with ``Lambda W0 + P Phi Q^T``, the low-rank term on the kernel's centre tap."""
    scale, phi = layer.router(x)
    g, latent = layer.groups, layer.router.latent
    q = layer.q.reshape(g, latent, -1)
    p = layer.p.reshape(g, -1, latent)
    kh, kw = layer.kernel_size
    bias = None if layer.bias is None else layer.bias[0]
    outs = []
    for b in range(x.shape[0]):
        kernel = scale[b].view(-1, 1, 1, 1) * layer.weight[0]
        low = torch.stack([p[i] @ phi[b, i] @ q[i] for i in range(g)]).reshape(layer.out_channels, -1)
        kernel = kernel.clone()
        kernel[:, :, (kh - 1) // 2, (kw - 1) // 2] += low
        outs.append(conv_with(conv, x[b : b + 1], kernel, bias))
    return torch.cat(outs)


def odconv_reference(layer: ODConv2d, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Per sample: one conv with ``sum_i a_w,i a_f a_c a_s W_i``, the bias mixed by ``a_w`` only."""
    kernel_att, filt, channel, spatial = layer.router(x)
    g = layer.groups
    c_out, per_group = layer.out_channels, layer.in_channels // g
    outs = []
    for b in range(x.shape[0]):
        kernel = (kernel_att[b].view(-1, 1, 1, 1, 1) * layer.weight).sum(0)
        group_of = torch.arange(c_out) // (c_out // g)
        index = group_of[:, None] * per_group + torch.arange(per_group)[None, :]  # global input channel
        kernel = kernel * channel[b][index][:, :, None, None]
        if filt is not None:
            kernel = kernel * filt[b].view(-1, 1, 1, 1)
        if spatial is not None:
            kernel = kernel * spatial[b].view(1, 1, *layer.kernel_size)
        bias = None if layer.bias is None else kernel_att[b] @ layer.bias
        outs.append(conv_with(conv, x[b : b + 1], kernel, bias))
    return torch.cat(outs)


REFERENCES = {"dcd": dcd_reference, "odconv": odconv_reference}
TF_SAME_SPEC = "tf_same"
SPECS = [*CONV_GRID, TF_SAME_SPEC]
SPEC_IDS = [*GRID_IDS, "tf_same"]


def conv_for(spec) -> nn.Conv2d:
    if spec == TF_SAME_SPEC:
        torch.manual_seed(0)
        conv = Conv2dSame(8, 12, 4, stride=2, bias=True)
        with torch.no_grad():
            conv.bias.normal_()
        return conv
    return make_conv(spec)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize(("kind", "experts"), VARIANTS, ids=VARIANT_IDS)
def test_from_conv_is_exact_and_then_follows_the_formula(kind, experts, spec) -> None:
    conv = conv_for(spec)
    layer = build(kind, conv, experts)
    assert_same_function(layer, conv)
    randomize_router(layer)
    x = torch.randn(3, conv.in_channels, 11, 13) + torch.linspace(-1, 1, 3).view(3, 1, 1, 1)
    with torch.no_grad():
        actual, expected = layer(x), REFERENCES[kind](layer, conv, x)
        single = layer(x[1:2])
    assert close_enough(actual, expected)
    assert close_enough(single, expected[1:2]), "batch 1 (another core form) differs"
    assert not close_enough(actual, conv(x)), "the randomised router should change the function"


@pytest.mark.parametrize("size", [2, 16], ids=["low-rank-path", "one-kernel-path"])
def test_dcd_pointwise_paths_follow_the_formula(size) -> None:
    """A 1x1 conv runs as one per-sample kernel on large maps, as static conv + low-rank term on small ones."""
    conv = make_conv((64, 48, 1, 1, 0, 1, 1, True, "zeros"))
    layer = DCDConv2d.from_conv(conv)
    x = torch.randn(3, 64, size, size) + torch.linspace(-1, 1, 3).view(3, 1, 1, 1)
    with torch.no_grad():
        assert close_enough(layer(x), conv(x))
        randomize_router(layer)
        assert close_enough(layer(x), dcd_reference(layer, conv, x))


@pytest.mark.parametrize("experts", [1, 3])
@pytest.mark.parametrize(("kernel", "groups", "stride"), [(3, 1, 1), (1, 1, 2), (3, 4, 2), (3, 8, 1)])
def test_core_kernel_terms_match_the_per_sample_reference(experts, kernel, groups, stride) -> None:
    """``modulation`` and ``offset``: values and gradients equal per-sample convs, in every strategy that can."""
    from dynconv.core import STRATEGIES, rules
    from dynconv.functional import dynamic_conv2d
    from dynconv.geometry import ConvGeometry

    gen = torch.Generator().manual_seed(kernel * 10 + groups + experts)
    per_group = 8 // groups
    x = torch.randn(3, 8, 9, 9, generator=gen)
    weight = torch.randn(experts, 8, per_group, kernel, kernel, generator=gen)
    routing = torch.softmax(torch.randn(3, experts, generator=gen), 1)
    bias = torch.randn(experts, 8, generator=gen)
    leaves = [
        torch.rand(3, 8, 1, 1, 1, generator=gen),
        torch.rand(3, 1, per_group, 1, 1, generator=gen),
        torch.rand(3, 1, 1, kernel, kernel, generator=gen),
        torch.randn(3, 8, per_group, kernel, kernel, generator=gen) * 0.1,
    ]
    conv_args = (stride, kernel // 2, 1, groups)

    def reference(factors, offset):
        kernels = (routing @ weight.flatten(1)).reshape(3, *weight.shape[1:]) * factors[0] * factors[1] * factors[2]
        kernels = kernels + offset
        return torch.cat([F.conv2d(x[b : b + 1], kernels[b], routing[b] @ bias, *conv_args) for b in range(3)])

    ref_leaves = [t.clone().requires_grad_() for t in leaves]
    expected = reference(ref_leaves[:3], ref_leaves[3])
    expected_grads = torch.autograd.grad(expected.square().sum(), ref_leaves)
    geom = ConvGeometry.build((kernel, kernel), stride, kernel // 2, 1, groups)
    names = [None, *(s for s in STRATEGIES if rules.applicable(s, 3, geom, modulated=True))]
    assert "output" not in names and len(names) >= 4
    for name in names:
        mine = [t.clone().requires_grad_() for t in leaves]
        out = dynamic_conv2d(x, weight, routing, bias, *conv_args, strategy=name, modulation=mine[:3], offset=mine[3])
        assert close_enough(out, expected), name
        for got, want in zip(torch.autograd.grad(out.square().sum(), mine), expected_grads, strict=True):
            assert close_enough(got, want), name
    with pytest.raises(ValueError, match="modulated"):
        dynamic_conv2d(x, weight, routing, bias, *conv_args, strategy="output", modulation=leaves[:1])


def test_router_outputs_at_conversion() -> None:
    """DCD: Lambda = 1 exactly and Phi = 0. ODConv: every sigmoid 1/2, softmax 1/n, experts 2^m (W + eps)."""
    conv = make_conv(CONV_GRID[0])  # 8 -> 16, 3x3
    x = torch.randn(4, 8, 9, 9) * 5
    dcd = DCDConv2d.from_conv(conv)
    scale, phi = dcd.router(x)
    assert torch.equal(scale, torch.ones(4, 16)) and torch.equal(phi, torch.zeros(4, 1, 3, 3))  # L = round(sqrt 8)
    assert torch.equal(dcd.weight[0], conv.weight) and dcd.experts == 1

    for experts, dense in ((4, conv), (1, nn.Conv2d(8, 8, 3, groups=8)), (2, nn.Conv2d(8, 16, 1))):
        layer = ODConv2d.from_conv(dense, experts=experts, noise=0.05, seed=1)
        kernel, filt, channel, spatial = layer.router(x)
        assert torch.equal(kernel, torch.full((4, experts), 1 / experts))
        assert torch.equal(channel, torch.full((4, 8), 0.5))
        depthwise, pointwise = dense.groups > 1, dense.kernel_size == (1, 1)
        assert (filt is None) == depthwise and (spatial is None) == pointwise
        for att in (filt, spatial):
            assert att is None or torch.equal(att, torch.full_like(att, 0.5))
        sigmoids = 1 + (not depthwise) + (not pointwise)
        assert layer.router.uniform_total() == 0.5**sigmoids
        torch.testing.assert_close(layer.weight.mean(0), dense.weight * 2**sigmoids, rtol=0, atol=1e-6)
        if experts > 1:
            assert not torch.equal(layer.weight[0], layer.weight[1])
        torch.testing.assert_close(layer.bias, dense.bias.expand(experts, -1), rtol=0, atol=0)  # bias not scaled


def mixed_net(bn: bool = True) -> nn.Sequential:
    """1x1, 3x3, depthwise, strided, dilated, grouped and biased convs, BatchNorms after some."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d if bn else lambda c: nn.Identity()
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1, bias=False),
        norm(32),
        nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
        norm(32),
        nn.ReLU(),
        nn.Conv2d(32, 24, 3, stride=2, padding=1),
        nn.Conv2d(24, 24, 3, padding=2, dilation=2, groups=4, bias=False),
        norm(24),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 5),
    )
    if bn:
        trained_batchnorms_(net, bias_half_width=0.5)
    return net.eval()


#: Both kinds in one model through a recipe: the deployment tests cover them in one export each.
MIXED_RECIPE = {
    "defaults": {"kind": "dcd"},
    "rules": [
        {"match": {"name": "0"}, "skip": False},
        {"match": {"name": ["2", "7"]}, "kind": "odconv", "experts": 4},
        {"match": {"name": "4"}, "kind": "odconv", "experts": 1},
    ],
}


def mixed_converted(bn: bool = True) -> tuple[nn.Module, nn.Module]:
    base = mixed_net(bn)
    model = convert.convert_model(base, MIXED_RECIPE, input_size=32).model.eval()
    for i, layer in enumerate(dynconv.dynamic_layers(model).values()):
        randomize_router(layer, seed=i)
    return base, model


def batch(n: int, size: int = 32) -> torch.Tensor:
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))
    return x + torch.linspace(-1, 1, n).view(n, 1, 1, 1)


def test_a_recipe_mixes_both_kinds_exactly() -> None:
    base = mixed_net()
    result = convert.convert_model(base, MIXED_RECIPE, input_size=32)
    kinds = {r.name: (r.kind, r.experts) for r in result.layers}
    assert kinds == {"0": ("dcd", 1), "2": ("odconv", 4), "4": ("odconv", 1), "7": ("odconv", 4), "8": ("dcd", 1)}
    with torch.no_grad():
        assert close_enough(result.model(batch(3)), base(batch(3)))


@pytest.mark.parametrize(("kind", "experts"), VARIANTS, ids=VARIANT_IDS)
def test_gradients_reach_every_new_parameter_at_batch_1_in_train_mode(kind, experts) -> None:
    base = mixed_net(bn=False).train()
    model = convert.convert_model(base, kind=kind, experts=experts, include="*", input_size=16).model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = batch(1, 16), torch.randn(1, 5)
    for _ in range(2):  # step 1 moves the zeroed heads; then every factor behind them gets gradient
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    for name, layer in dynconv.dynamic_layers(model).items():
        for pname, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"


def test_parameter_counts_follow_the_hand_formula() -> None:
    c_in, c_out, k, h = 32, 48, 3, 16  # h = max(32 // 16, 16)
    dcd = DCDConv2d.from_conv(nn.Conv2d(c_in, c_out, k))
    latent = round(math.sqrt(c_in))  # 6
    expected = c_out * c_in * k * k + c_out  # W0 and bias
    expected += latent * c_in + c_out * latent  # Q and P
    expected += c_in * h + h + h * c_out + c_out + h * latent**2 + latent**2  # fc, Lambda head, Phi head
    assert sum(p.numel() for p in dcd.parameters()) == expected

    dw = DCDConv2d.from_conv(nn.Conv2d(c_in, c_in, k, groups=c_in, bias=False), latent=2)
    expected = c_in * k * k + 2 * c_in + c_in * 2 + c_in * h + h + h * c_in + c_in + h * c_in * 4 + c_in * 4
    assert sum(p.numel() for p in dw.parameters()) == expected

    od = ODConv2d.from_conv(nn.Conv2d(c_in, c_out, k, bias=False), experts=4)
    heads = (h + 1) * (c_in + c_out + k * k + 4)  # channel, filter, spatial, kernel heads
    assert sum(p.numel() for p in od.parameters()) == 4 * c_out * c_in * k * k + c_in * h + h + heads
    od1 = ODConv2d.from_conv(nn.Conv2d(c_in, c_in, 1, groups=c_in), experts=1)  # depthwise 1x1: channel head only
    assert sum(p.numel() for p in od1.parameters()) == c_in + c_in + c_in * h + h + (h + 1) * c_in


@pytest.mark.parametrize(
    ("name", "kind", "experts"),
    [
        ("mobilenet_v2", "dcd", 1),
        ("mobilenet_v2", "odconv", 4),
        ("resnet18", "odconv", 1),
        ("tf_efficientnet_b0", "dcd", 1),
    ],
)
def test_real_models_convert_exactly(name, kind, experts) -> None:
    """Depthwise and 1x1 convs (MobileNetV2), dense 3x3 on small maps (ResNet-18), TF-'same' convs (timm)."""
    torch.manual_seed(0)
    model = convert.build_model(name).eval()
    result = convert.convert_model(model, kind=kind, experts=experts, input_size=64)
    assert len(result.layers) > 15 and all(r.kind == kind for r in result.layers)
    x = batch(2, 64)
    with torch.no_grad():
        assert close_enough(result.model(x), model(x))


def test_checkpoint_round_trip(tmp_path) -> None:
    """Both kinds (through the mixed recipe), routers as if trained: bit-identical after a reload."""
    _, model = mixed_converted()
    path = convert.save_checkpoint(model, tmp_path / "mixed.safetensors")
    assert {r["kind"] for r in convert.read_metadata(path)["layers"]} == {"dcd", "odconv"}
    loaded = convert.load_checkpoint(path, model=mixed_net())
    x = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_cli_converts_each_kind_and_lists_it(tmp_path) -> None:
    sys.path.insert(0, str(TESTS))
    runner = CliRunner()
    for kind in ("dcd", "odconv"):
        out = tmp_path / f"{kind}.safetensors"
        args = ["convert", "cli_models:small_net", "--kind", kind, "--input-size", "16", "-o", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr
        assert {r["kind"] for r in convert.read_metadata(out)["layers"]} == {kind}
    listing = runner.invoke(app, ["kinds"])
    assert listing.exit_code == 0
    assert "dcd  DCD: dynamic convolution decomposition" in listing.stdout
    assert "odconv  ODConv: omni-dimensional dynamic convolution" in listing.stdout
    assert "latent=None, reduction=16, min_hidden=16" in listing.stdout


@pytest.mark.parametrize("kind", ["dcd", "odconv"])
def test_timm_conv_classes(kind, tmp_path) -> None:
    """DCD keeps TF 'same' and weight standardisation (of W0); ODConv both (each expert standardised)."""
    for make in (
        lambda: Conv2dSame(8, 16, 3, stride=2),
        lambda: StdConv2dSame(8, 16, 4, stride=2),
        lambda: ScaledStdConv2d(8, 16, 3, padding=1, gain_init=1.5),
    ):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), make(), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
        with torch.no_grad():
            model[1].weight.mul_(2).add_(0.1)  # not already standardised
        result = convert.convert_model(model, kind=kind, input_size=13)
        assert [r.name for r in result.layers] == ["1", "3"]
        for size in (13, 16):
            x = torch.randn(2, 3, size, size)
            assert close_enough(result.model(x), model(x)), size


def test_fold_batchnorm_is_exact_for_both_kinds() -> None:
    _, model = mixed_converted()
    result = fold_batchnorm(model)
    assert {(p.conv, p.kind, p.shift) for p in result.folded} == {
        ("2", "odconv", "bias"),
        ("4", "odconv", "bias"),
        ("8", "dcd", "bias"),
    }
    assert not result.skipped
    x = batch(3)
    with torch.no_grad():
        assert close_enough(result.model(x), model(x))
    standardised = DCDConv2d.from_conv(nn.Conv2d(4, 4, 3), standardize=dynconv.WeightStandardization())
    with pytest.raises(ValueError, match="weight-standardised"):
        dynconv.fold_batchnorm_(standardised, nn.BatchNorm2d(4).eval())


def test_onnx_export_fixed_and_dynamic_batch(tmp_path) -> None:
    import onnxruntime as ort

    _, model = mixed_converted()
    fixed = convert.export_onnx(model, tmp_path / "b1.onnx", batch=1, input_shape=(3, 32, 32))
    assert fixed.checks[0].batch == 1 and all(c.ok for c in fixed.checks)
    dynamic = convert.export_onnx(model, tmp_path / "any.onnx", input_shape=(3, 32, 32), fold_bn=True)
    assert [c.batch for c in dynamic.checks] == [1, 3] and all(c.ok for c in dynamic.checks)
    session = ort.InferenceSession(str(tmp_path / "any.onnx"), providers=["CPUExecutionProvider"])
    x = batch(5)
    with torch.no_grad():
        assert close_enough(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), model(x))


def test_torch_export_fx_and_compile_with_a_dynamic_batch() -> None:
    _, model = mixed_converted()
    program = torch.export.export(model, (batch(2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    traced = torch.fx.symbolic_trace(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="eager")  # fullgraph: a break raises
    exported = program.module()
    with torch.no_grad():
        for n in (1, 3, 5):
            expected = model(batch(n))
            runs = [("export", exported), ("fx", traced)] + ([("compile", compiled)] if n > 1 else [])
            for name, fn in runs:  # compile: batch 1 would be one more (specialised) graph, as for a static model
                assert close_enough(fn(batch(n)), expected), (name, n)
