"""The three layers: exact conversion from nn.Conv2d, training, state, compile, routing."""

from __future__ import annotations

import io

import pytest
import torch
from reference import close_enough
from torch import nn

import dynconv
from dynconv import CondConv2d, DyConv2d, DynamicConv2d, DyNetConv2d

KINDS = [CondConv2d, DyConv2d, DyNetConv2d]
KIND_IDS = [cls.kind for cls in KINDS]

# (in, out, kernel, stride, padding, dilation, groups, bias, padding_mode)
CONV_GRID = [
    (8, 16, 3, 1, 1, 1, 1, True, "zeros"),
    (8, 16, 3, 2, 1, 1, 1, False, "zeros"),
    (16, 8, 1, 1, 0, 1, 1, True, "zeros"),
    (16, 32, 1, 2, 0, 1, 1, False, "zeros"),
    (12, 12, 3, 1, 1, 1, 12, False, "zeros"),  # depthwise
    (6, 12, 5, 2, 2, 1, 6, True, "zeros"),  # depthwise, channel multiplier 2
    (8, 12, 3, 1, "same", 2, 4, True, "zeros"),  # grouped, dilated, 'same'
    (8, 8, 4, 1, "same", 1, 1, True, "zeros"),  # even kernel: asymmetric 'same'
    (8, 8, 3, 1, "valid", 1, 2, False, "zeros"),
    (8, 8, (1, 7), 1, (0, 3), 1, 1, True, "zeros"),  # rectangular (Inception-style)
    (8, 8, 3, 1, 1, 1, 1, True, "reflect"),
    (8, 8, 3, 2, 1, 1, 1, False, "replicate"),
    (8, 8, 3, 1, 2, 2, 1, True, "circular"),
    (8, 8, 2, 1, "same", 1, 1, False, "reflect"),
]
GRID_IDS = [f"conv{i}" for i in range(len(CONV_GRID))]


def make_conv(spec, seed: int = 0) -> nn.Conv2d:
    c_in, c_out, k, stride, padding, dilation, groups, bias, mode = spec
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, dilation, groups, bias, mode)
    with torch.no_grad():  # a "trained" bias, not the tiny default
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


def assert_same_function(layer: nn.Module, conv: nn.Conv2d) -> None:
    """``layer`` computes what ``conv`` computes: batch 3 and 1, eval and train, contiguous and channels_last."""
    for batch, size in ((3, 11), (1, 9)):
        x = torch.randn(batch, conv.in_channels, size, size + 2) * 3
        for train in (False, True):
            conv.train(train)
            layer.train(train)
            expected = conv(x)
            assert close_enough(layer(x), expected), f"batch={batch} train={train}"
            x_cl = x.contiguous(memory_format=torch.channels_last)
            assert close_enough(layer(x_cl), expected), "channels_last"


@pytest.mark.parametrize("spec", CONV_GRID, ids=GRID_IDS)
@pytest.mark.parametrize("cls", KINDS, ids=KIND_IDS)
def test_from_conv_computes_the_same_function(cls: type[DynamicConv2d], spec) -> None:
    conv = make_conv(spec)
    layer = cls.from_conv(conv, experts=4, seed=3)
    assert_same_function(layer, conv)


@pytest.mark.parametrize("cls", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("experts", [1, 2, 8])
def test_from_conv_any_expert_count(cls, experts) -> None:
    conv = make_conv(CONV_GRID[0])
    layer = cls.from_conv(conv, experts=experts)
    x = torch.randn(2, 8, 10, 10)
    assert close_enough(layer(x), conv(x))
    assert layer.weight.shape == (experts, 16, 8, 3, 3)


@pytest.mark.parametrize("cls", KINDS, ids=KIND_IDS)
def test_experts_differ_but_mix_back_to_the_original(cls) -> None:
    conv = make_conv(CONV_GRID[0])
    layer = cls.from_conv(conv, experts=4, noise=0.05, seed=1)
    w = layer.weight.detach()
    for k in range(1, 4):
        assert not torch.equal(w[0], w[k])
    scale = layer.router.uniform_total()
    torch.testing.assert_close(w.sum(0) * scale / 4, conv.weight.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", KINDS, ids=KIND_IDS)
def test_same_seed_same_weights(cls) -> None:
    conv = make_conv(CONV_GRID[1])
    a = cls.from_conv(conv, experts=4, seed=11).state_dict()
    b = cls.from_conv(conv, experts=4, seed=11).state_dict()
    c = cls.from_conv(conv, experts=4, seed=12).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["weight"], c["weight"])


def test_sigmoid_routing_scale_documented_behaviour() -> None:
    """CondConv's zeroed router gives 1/2 per expert, so experts carry 2/K of the kernel."""
    conv = make_conv(CONV_GRID[0])
    layer = CondConv2d.from_conv(conv, experts=8, noise=0.0)
    r = layer.route(torch.randn(3, 8, 6, 6))
    torch.testing.assert_close(r, torch.full((3, 8), 0.5))
    torch.testing.assert_close(layer.weight[0], conv.weight * 2 / 8)


def _train_expert_spread(cls: type[DynamicConv2d], noise: float, steps: int = 20) -> float:
    """Train a fresh conversion; return how far the experts' updates differ from their mean."""
    layer = cls.from_conv(make_conv(CONV_GRID[0]), experts=4, noise=noise, seed=0)
    dynconv.set_temperature(layer, 1.0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = layer.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(4, 16, 10, 10, generator=gen)
    for _ in range(steps):
        x = torch.randn(4, 8, 10, 10, generator=gen)
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    updates = (layer.weight.detach() - before).flatten(1)
    assert (updates.abs().sum(1) > 0).all()  # every expert trains
    return (updates - updates.mean(0)).abs().max().item()


@pytest.mark.parametrize("cls", KINDS, ids=KIND_IDS)
def test_training_separates_the_experts(cls) -> None:
    """Zero-sum noise is what lets training separate the experts: exact copies stay copies."""
    assert _train_expert_spread(cls, noise=0.0) == 0.0
    assert _train_expert_spread(cls, noise=0.05) > 1e-6


@pytest.mark.parametrize("cls", KINDS, ids=KIND_IDS)
def test_attributes_mirror_conv2d(cls) -> None:
    conv = nn.Conv2d(
        6, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=1, groups=3, bias=False, padding_mode="reflect"
    )
    layer = cls.from_conv(conv, experts=3)
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert layer.experts == 3 and layer.bias is None
    text = repr(layer)
    for piece in (
        "6, 12",
        "kernel_size=(3, 5)",
        "stride=(2, 1)",
        "experts=3",
        "groups=3",
        "bias=False",
        "padding_mode='reflect'",
        "padding=(1, 2)",
    ):
        assert piece in text, piece


@pytest.mark.parametrize("cls", KINDS, ids=KIND_IDS)
def test_constructor_matches_conv2d_signature(cls) -> None:
    layer = cls(8, 16, 3, 1, 1, 1, 1, True, "zeros", experts=2)
    assert layer(torch.randn(2, 8, 7, 7)).shape == (2, 16, 7, 7)
    assert layer.weight.shape == (2, 16, 8, 3, 3) and layer.bias.shape == (2, 16)
    assert not torch.equal(layer.weight[0], layer.weight[1])  # from scratch: independent experts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"experts": 0}, "experts"),
        ({"groups": 3}, "divisible by groups"),
        ({"padding_mode": "mirror"}, "padding_mode"),
        ({"padding": "same", "stride": 2}, "strided"),
    ],
)
def test_constructor_rejects_impossible_options(kwargs, message) -> None:
    args = {"in_channels": 8, "out_channels": 16, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        DyConv2d(**args)


def test_router_options() -> None:
    conv = make_conv(CONV_GRID[0])
    dy = DyConv2d.from_conv(conv, experts=4, reduction=2, min_hidden=1, temperature=10.0)
    assert dy.router.fc1.out_features == 4 and float(dy.router.temperature) == 10.0
    assert DyConv2d.from_conv(conv, reduction=16).router.fc1.out_features == 16  # min_hidden
    cc = CondConv2d.from_conv(conv, experts=4, dropout=0.2)
    assert cc.router.dropout.p == 0.2
    with pytest.raises(ValueError, match="dropout"):
        CondConv2d.from_conv(conv, dropout=1.5)
    with pytest.raises(TypeError):
        DyNetConv2d.from_conv(conv, temperature=3.0)
    with pytest.raises(TypeError, match=r"nn\.Conv2d"):
        CondConv2d.from_conv(nn.Linear(3, 3))


def test_routing_dropout_keeps_a_fresh_conversion_exact_in_train_mode() -> None:
    conv = make_conv(CONV_GRID[0])
    layer = CondConv2d.from_conv(conv, experts=4, dropout=0.5).train()
    x = torch.randn(4, 8, 9, 9)
    assert close_enough(layer(x), conv(x))


@pytest.mark.parametrize("cls", KINDS, ids=KIND_IDS)
def test_state_dict_round_trip(cls) -> None:
    layer = cls(8, 12, 3, padding=1, experts=3)
    if isinstance(layer, DyConv2d):
        dynconv.set_temperature(layer, 4.0)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = cls(8, 12, 3, padding=1, experts=3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", KINDS, ids=KIND_IDS)
def test_batch_of_one_in_train_mode(cls) -> None:
    layer = cls.from_conv(make_conv(CONV_GRID[0]), experts=4).train()
    out = layer(torch.randn(1, 8, 6, 6))
    out.sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("cls", KINDS, ids=KIND_IDS)
def test_torch_compile_fullgraph_same_output(cls) -> None:
    torch._dynamo.reset()
    layer = cls.from_conv(make_conv(CONV_GRID[0]), experts=4, noise=0.1).eval()
    with torch.no_grad():  # make routing input-dependent, so the compiled router is really exercised
        for p in layer.router.parameters():
            p.normal_(0, 0.1)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)


def test_forced_strategy_on_a_layer() -> None:
    conv = make_conv(CONV_GRID[0])
    layer = DyConv2d.from_conv(conv, experts=2)
    x = torch.randn(3, 8, 9, 9)
    for strategy in ("loop", "grouped", "unfold", "output"):
        layer.strategy = strategy
        assert close_enough(layer(x), conv(x)), strategy
        assert f"strategy='{strategy}'" in repr(layer)
    with pytest.raises(ValueError, match="unknown strategy"):
        layer.strategy = "warp"


def test_capture_routing_is_opt_in_and_detached() -> None:
    model = nn.Sequential(
        CondConv2d(3, 8, 3, padding=1, experts=2),
        nn.ReLU(),
        DyNetConv2d(8, 6, 1, experts=3),
    )
    model(torch.randn(2, 3, 8, 8))
    assert all(m.last_routing is None for m in dynconv.dynamic_layers(model).values())
    with dynconv.capture_routing(model) as routing:
        model(torch.randn(2, 3, 8, 8))
    assert routing["0"].shape == (2, 2) and routing["2"].shape == (2, 3, 6)
    assert not routing["0"].requires_grad
    assert all(m.last_routing is None and not m.capture_routing for m in dynconv.dynamic_layers(model).values())


def test_set_temperature_counts_softmax_layers() -> None:
    model = nn.Sequential(DyConv2d(3, 4, 3, experts=2), CondConv2d(4, 4, 1), DyConv2d(4, 4, 1, experts=2))
    assert dynconv.set_temperature(model, 5.0) == 2
    assert float(model[0].router.temperature) == 5.0
    with pytest.raises(ValueError):
        dynconv.set_temperature(model, 0.0)


def test_temperature_schedule_anneals_linearly_and_resumes() -> None:
    model = nn.Sequential(DyConv2d(3, 4, 3, experts=2))
    schedule = dynconv.TemperatureSchedule(model, steps=10)
    assert float(model[0].router.temperature) == 30.0
    values = [schedule.step() for _ in range(12)]
    assert values[4] == pytest.approx(30 - 29 * 5 / 10)
    assert values[9] == values[11] == 1.0
    resumed = dynconv.TemperatureSchedule(nn.Sequential(DyConv2d(3, 4, 3, experts=2)), steps=10)
    resumed.load_state_dict({"count": 5, "steps": 10, "start": 30.0, "end": 1.0})
    assert float(resumed.model[0].router.temperature) == pytest.approx(15.5)


def test_temperature_changes_sharpness_not_the_fresh_conversion() -> None:
    conv = make_conv(CONV_GRID[0])
    layer = DyConv2d.from_conv(conv, experts=4)
    x = torch.randn(2, 8, 8, 8)
    dynconv.set_temperature(layer, 1.0)
    assert close_enough(layer(x), conv(x))  # zeroed router: uniform at any temperature
    with torch.no_grad():
        layer.router.fc2.weight.normal_()
    dynconv.set_temperature(layer, 1.0)
    sharp = layer.route(x)
    dynconv.set_temperature(layer, 30.0)
    flat = layer.route(x)
    assert (flat - 0.25).abs().max() < (sharp - 0.25).abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_from_conv_keeps_dtype(dtype) -> None:
    conv = make_conv(CONV_GRID[0]).to(dtype)
    layer = DyNetConv2d.from_conv(conv, experts=2)
    assert layer.weight.dtype == dtype and layer.router.fc.weight.dtype == dtype
    x = torch.randn(2, 8, 8, 8, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(layer(x), conv(x), rtol=tol, atol=tol * conv(x).abs().max().item())


def test_layer_registry() -> None:
    assert dynconv.layer_class("dyconv") is DyConv2d
    assert set(dynconv.LAYERS) == {"condconv", "dyconv", "dynet", "dcd", "odconv"}
    with pytest.raises(ValueError, match="unknown kind"):
        dynconv.layer_class("odconv2")
