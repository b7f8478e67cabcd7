"""The core against the per-sample reference: every strategy, values and gradients."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from reference import per_sample_conv

from dynconv.core import rules
from dynconv.functional import STRATEGIES, dynamic_conv2d, select_strategy, strategy_scope
from dynconv.geometry import ConvGeometry


@dataclass(frozen=True)
class Config:
    batch: int
    experts: int
    c_in: int
    c_out: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: object
    dilation: tuple[int, int]
    bias: bool
    per_channel: bool
    size: tuple[int, int]
    channels_last: bool

    def conv_args(self) -> tuple:
        return (self.stride, self.padding, self.dilation, self.groups)


def random_configs(count: int, seed: int = 1234) -> list[Config]:
    """A fixed, seeded sweep over every conv option the core accepts."""
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        groups = rng.choice([1, 1, 2, 3, "depthwise", "multiplier"])
        base = rng.choice([2, 3, 4])
        if groups == "depthwise":
            groups, c_in, c_out = base * 2, base * 2, base * 2
        elif groups == "multiplier":  # depthwise with a channel multiplier of 2
            groups, c_in, c_out = base, base, base * 2
        else:
            c_in, c_out = groups * rng.choice([1, 2, 3]), groups * rng.choice([1, 2, 4])
        kernel = rng.choice([(1, 1), (1, 1), (3, 3), (3, 3), (2, 2), (5, 5), (1, 3), (3, 2)])
        stride = rng.choice([(1, 1), (1, 1), (2, 2), (1, 2)])
        padding = rng.choice([0, 1, (2, 1), "valid", "same"] if stride == (1, 1) else [0, 1, (1, 2), "valid"])
        dilation = rng.choice([(1, 1), (1, 1), (2, 2), (1, 2)])
        cfg = Config(
            batch=rng.choice([1, 2, 3, 5]),
            experts=rng.choice([1, 2, 3, 4]),
            c_in=c_in,
            c_out=c_out,
            groups=groups,
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=rng.random() < 0.6,
            per_channel=rng.random() < 0.4,
            size=(rng.randint(6, 12), rng.randint(6, 12)),
            channels_last=rng.random() < 0.3,
        )
        geom = ConvGeometry.build(kernel, stride, padding, dilation, 1)
        try:
            geom.output_size(*cfg.size)
        except ValueError:  # dilated kernel larger than the input: not a valid conv
            continue
        configs.append(cfg)
    return configs


CONFIGS = random_configs(60)


def make_tensors(cfg: Config, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, cfg.c_in, *cfg.size, generator=gen, dtype=dtype)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cfg.experts, cfg.c_out, cfg.c_in // cfg.groups, *cfg.kernel, generator=gen, dtype=dtype)
    r_shape = (cfg.batch, cfg.experts, cfg.c_out) if cfg.per_channel else (cfg.batch, cfg.experts)
    r = torch.rand(r_shape, generator=gen, dtype=dtype)
    b = torch.randn(cfg.experts, cfg.c_out, generator=gen, dtype=dtype) if cfg.bias else None
    return x, w, r, b


def usable_strategies(cfg: Config) -> list[str | None]:
    geom = ConvGeometry.build(cfg.kernel, cfg.stride, cfg.padding, cfg.dilation, cfg.groups)
    return [None] + [s for s in STRATEGIES if rules.applicable(s, cfg.batch, geom)]


def grads(fn, tensors, upstream):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    out.backward(upstream)
    return out.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_every_strategy_matches_per_sample_loop(cfg: Config) -> None:
    """Forward and all four gradients equal the reference for every applicable strategy."""
    x, w, r, b = make_tensors(cfg)
    expected = per_sample_conv(x, w, r, b, *cfg.conv_args())
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7))
    ref_out, ref_grads = grads(lambda *t: per_sample_conv(*t, *cfg.conv_args()), (x, w, r, b), upstream)
    for strategy in usable_strategies(cfg):
        out, got = grads(
            lambda *t, s=strategy: dynamic_conv2d(*t, *cfg.conv_args(), strategy=s), (x, w, r, b), upstream
        )
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4, msg=f"forward, strategy={strategy}")
        for name, g, g_ref in zip("input weight routing bias".split(), got, ref_grads, strict=True):
            if g_ref is None:
                assert g is None
                continue
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=2e-4, msg=f"d{name}, strategy={strategy}")


@pytest.mark.parametrize("cfg", CONFIGS[:20], ids=[f"cfg{i}" for i in range(20)])
def test_channels_last_in_channels_last_out(cfg: Config) -> None:
    x, w, r, b = make_tensors(cfg)
    x = x.contiguous(memory_format=torch.channels_last)
    expected = per_sample_conv(x.contiguous(), w, r, b, *cfg.conv_args())
    for strategy in usable_strategies(cfg):
        out = dynamic_conv2d(x, w, r, b, *cfg.conv_args(), strategy=strategy)
        unambiguous = not x.is_contiguous()  # a 1-channel input is both layouts at once
        if unambiguous and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:
            assert out.is_contiguous(memory_format=torch.channels_last), strategy
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_contiguous_input_gives_contiguous_output() -> None:
    x, w, r, b = make_tensors(CONFIGS[0])
    assert dynamic_conv2d(x.contiguous(), w, r, b, *CONFIGS[0].conv_args()).is_contiguous()


GRADCHECK_CASES = [
    # (c_in, c_out, kernel, stride, padding, groups, per_channel, bias)
    (3, 4, 3, 1, 1, 1, False, True),
    (3, 4, 3, 2, 0, 1, True, True),
    (4, 4, 3, 1, "same", 4, False, False),
    (4, 6, 1, 1, 0, 2, True, True),
    (2, 3, 2, 1, "same", 1, True, False),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_float64(case) -> None:
    c_in, c_out, k, stride, padding, groups, per_channel, bias = case
    batch, experts = 2, 3
    x = torch.randn(batch, c_in, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(experts, c_out, c_in // groups, k, k, dtype=torch.float64, requires_grad=True)
    r_shape = (batch, experts, c_out) if per_channel else (batch, experts)
    r = torch.rand(r_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(experts, c_out, dtype=torch.float64, requires_grad=True) if bias else None
    geom = ConvGeometry.build((k, k), stride, padding, 1, groups)
    for strategy in [s for s in STRATEGIES if rules.applicable(s, batch, geom)]:
        inputs = (x, w, r) if b is None else (x, w, r, b)

        def fn(*t, s=strategy):
            return dynamic_conv2d(*t[:3], t[3] if len(t) > 3 else None, stride, padding, 1, groups, strategy=s)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5), strategy


def torch_grouped_conv_is_sound(dtype: torch.dtype, cfg: Config) -> bool:
    """Whether torch's grouped conv at ``dtype`` matches float64 for this geometry (3 groups of the config's)."""
    gen = torch.Generator().manual_seed(0)
    groups = 3 * cfg.groups
    x = torch.randn(1, 3 * cfg.c_in, *cfg.size, generator=gen, dtype=torch.float64)
    w = torch.randn(3 * cfg.c_out, cfg.c_in // cfg.groups, *cfg.kernel, generator=gen, dtype=torch.float64)
    args = (cfg.stride, cfg.padding, cfg.dilation, groups)
    expected = F.conv2d(x, w, None, *args)
    out = F.conv2d(x.to(dtype), w.to(dtype), None, *args).double()
    return bool(((out - expected).abs().max() <= 0.1 * expected.abs().max() + 0.1).item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [CONFIGS[i] for i in (0, 3, 5, 8, 13)], ids=lambda c: f"k{c.kernel}g{c.groups}")
def test_half_precisions(dtype: torch.dtype, cfg: Config) -> None:
    x, w, r, b = make_tensors(cfg, dtype=torch.float32)
    expected = per_sample_conv(x, w, r, b, *cfg.conv_args())
    half = [t.to(dtype) if t is not None else None for t in (x, w, r, b)]
    # The batch fold and output mixing are one grouped F.conv2d; where torch's own half-precision
    # grouped conv is wrong on this CPU (oneDNN, e.g. bf16 with stride 2 and dilation (1, 2) on AMX
    # machines), a static grouped conv is wrong too, and those forms cannot be right either.
    broken = set() if torch_grouped_conv_is_sound(dtype, cfg) else {"grouped", "output"}
    geom = ConvGeometry.build(cfg.kernel, cfg.stride, cfg.padding, cfg.dilation, cfg.groups)
    if select_strategy(half[0], half[1], geom, needs_grad=False) in broken:
        broken.add(None)
    for strategy in [s for s in usable_strategies(cfg) if s not in broken]:
        out = dynamic_conv2d(*half, *cfg.conv_args(), strategy=strategy)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=0.15 * expected.abs().max().item())


def test_autocast_bfloat16_matches_static_conv_dtype() -> None:
    cfg = CONFIGS[2]
    x, w, r, b = make_tensors(cfg)
    expected = per_sample_conv(x, w, r, b, *cfg.conv_args())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        static = F.conv2d(x, w[0], None, *cfg.conv_args())
        for strategy in usable_strategies(cfg):
            out = dynamic_conv2d(x, w, r, b, *cfg.conv_args(), strategy=strategy)
            assert out.dtype == static.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=0.1 * expected.abs().max().item())


def test_autocast_backward_reaches_float32_parameters() -> None:
    x = torch.randn(3, 4, 8, 8)
    w = torch.randn(2, 6, 4, 3, 3, requires_grad=True)
    r = torch.rand(3, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dynamic_conv2d(x, w, r, None, 1, 1)
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    assert r.grad is not None and r.grad.shape == r.shape


def test_batch_of_one_uses_a_single_plain_conv() -> None:
    x, w, r, b = torch.randn(1, 4, 9, 9), torch.randn(3, 5, 4, 3, 3), torch.rand(1, 3), torch.randn(3, 5)
    geom = ConvGeometry.build((3, 3), 1, 1, 1, 1)
    assert select_strategy(x, w, geom, needs_grad=False) == "single"
    torch.testing.assert_close(dynamic_conv2d(x, w, r, b, 1, 1), per_sample_conv(x, w, r, b, 1, 1))


def test_multi_chunk_fold_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the batch-fold to split a batch of 7 into chunks of 2 (the big-layer path)."""
    monkeypatch.setattr(rules, "FOLD_MAX_CHUNK", 2)
    monkeypatch.setattr(rules, "FOLD_MAX_CHUNK_GRAD", 2)
    x, w, r, b = torch.randn(7, 6, 8, 8), torch.randn(3, 4, 3, 3, 3), torch.rand(7, 3, 4), torch.randn(3, 4)
    assert rules.fold_chunk(7, w[0].numel() * 4, needs_grad=False) == 2
    out = dynamic_conv2d(x, w, r, b, 2, 1, 1, 2, strategy="grouped")
    torch.testing.assert_close(out, per_sample_conv(x, w, r, b, 2, 1, 1, 2))


def test_fold_chunk_keeps_mixed_kernels_within_budget() -> None:
    big = 9 * 2**20  # one ResNet-18 layer4 kernel in fp32
    assert rules.fold_chunk(32, big, needs_grad=False) * big <= rules.FOLD_BUDGET_BYTES
    assert rules.fold_chunk(32, 10 * 2**30, needs_grad=True) == 1
    assert rules.fold_chunk(3, 16, needs_grad=False) == 3


@pytest.mark.parametrize(
    ("kernel", "groups", "c_in", "batch", "grad", "size", "expected"),
    [
        ((1, 1), 1, 16, 8, False, 14, "matmul"),
        ((1, 1), 1, 16, 1, False, 14, "matmul"),
        ((3, 3), 1, 16, 1, True, 14, "single"),
        ((3, 3), 16, 16, 8, False, 28, "grouped"),
        ((3, 3), 1, 16, 8, False, 7, "grouped"),
        ((3, 3), 1, 16, 8, True, 7, "unfold"),
        ((3, 3), 1, 16, 8, True, 28, "grouped"),
    ],
)
def test_selection_follows_measured_preferences(kernel, groups, c_in, batch, grad, size, expected) -> None:
    x = torch.empty(batch, c_in, size, size)
    w = torch.empty(2, 16, c_in // groups, *kernel)
    geom = ConvGeometry.build(kernel, 1, kernel[0] // 2, 1, groups)
    assert select_strategy(x, w, geom, needs_grad=grad) == expected


@pytest.mark.parametrize("groups", [1, 16])
def test_channels_last_inference_runs_depthwise_per_sample_instead_of_folding(groups: int) -> None:
    """The fold would copy channels_last maps in and out; one depthwise conv per sample reads them in place.
    Dense kernels keep the fold (per sample they measured slower at 2 threads)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 28, 28, generator=gen)
    w, r = torch.randn(2, 16, 16 // groups, 3, 3, generator=gen), torch.rand(8, 2, generator=gen)
    geom = ConvGeometry.build((3, 3), 1, 1, 1, groups)
    last = x.contiguous(memory_format=torch.channels_last)
    assert select_strategy(x, w, geom, needs_grad=False) == "grouped"
    assert select_strategy(last, w, geom, needs_grad=False) == ("loop" if groups == 16 else "grouped")
    assert select_strategy(last, w, geom, needs_grad=True) == "grouped"  # training keeps its measured order
    out = dynamic_conv2d(last, w, r, None, 1, 1, 1, groups)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, per_sample_conv(x, w, r, None, 1, 1, 1, groups), rtol=1e-5, atol=1e-4)
    with strategy_scope("grouped", "matmul"):  # a scope still decides
        assert select_strategy(last, w, geom, needs_grad=False) == "grouped"


@pytest.mark.parametrize(
    ("c_out", "experts", "grad", "expected"),
    [(512, 4, False, "output"), (512, 4, True, "unfold"), (256, 4, False, "grouped"), (512, 8, False, "grouped")],
)
def test_inference_on_small_maps_with_big_kernels_mixes_outputs(c_out, experts, grad, expected) -> None:
    """ResNet-18 layer4 at batch 16: K-fold MACs cost less than writing a 9 MB kernel per sample."""
    x = torch.empty(16, 512, 7, 7)
    w = torch.empty(experts, c_out, 512 if c_out == 512 else 256, 3, 3)
    x = x[:, : w.shape[2]]
    geom = ConvGeometry.build((3, 3), 1, 1, 1, 1)
    assert select_strategy(x, w, geom, needs_grad=grad) == expected


def test_strategy_scope_keeps_batch_out_of_conv_groups() -> None:
    x, w1, w3 = torch.randn(4, 8, 6, 6), torch.randn(2, 8, 8, 1, 1), torch.randn(2, 8, 8, 3, 3)
    dw = torch.randn(2, 8, 1, 3, 3)
    with strategy_scope("matmul", "unfold", "output"):
        assert select_strategy(x, w1, ConvGeometry.build((1, 1), 1, 0, 1, 1), False) == "matmul"
        assert select_strategy(x, w3, ConvGeometry.build((3, 3), 1, 1, 1, 1), False) == "unfold"
        assert select_strategy(x, dw, ConvGeometry.build((3, 3), 1, 1, 1, 8), False) == "output"
        r = torch.rand(4, 2)
        torch.testing.assert_close(dynamic_conv2d(x, w3, r, None, 1, 1), per_sample_conv(x, w3, r, None, 1, 1))
    assert select_strategy(x, w3, ConvGeometry.build((3, 3), 1, 1, 1, 1), False) == "grouped"
    with pytest.raises(ValueError, match="unknown strategy"):
        with strategy_scope("fastest"):
            pass


def _valid():
    return dict(input=torch.randn(2, 4, 8, 8), weight=torch.randn(3, 6, 4, 3, 3), routing=torch.rand(2, 3), bias=None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input": torch.randn(2, 5, 8, 8)}, "input channels"),
        ({"input": torch.randn(4, 8, 8)}, "input must be 4-D"),
        ({"weight": torch.randn(6, 4, 3, 3)}, "weight must be 5-D"),
        ({"routing": torch.rand(3, 3)}, "routing batch"),
        ({"routing": torch.rand(2, 4)}, "routing experts"),
        ({"routing": torch.rand(2, 3, 5)}, "routing channels"),
        ({"routing": torch.rand(2)}, "routing must be"),
        ({"bias": torch.randn(6)}, "bias must be"),
        ({"input": torch.randn(2, 4, 8, 8, dtype=torch.float64)}, "dtype"),
        ({"input": torch.randn(2, 4, 2, 2)}, "smaller than the dilated kernel"),
    ],
)
def test_invalid_shapes_name_the_dimension(change, message) -> None:
    args = {**_valid(), **change}
    with pytest.raises(ValueError, match=message):
        dynamic_conv2d(args["input"], args["weight"], args["routing"], args["bias"])


def test_invalid_options() -> None:
    a = _valid()
    with pytest.raises(ValueError, match="strided"):
        dynamic_conv2d(a["input"], a["weight"], a["routing"], stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be"):
        dynamic_conv2d(a["input"], a["weight"], a["routing"], padding="full")
    with pytest.raises(ValueError, match="unknown strategy"):
        dynamic_conv2d(a["input"], a["weight"], a["routing"], strategy="magic")
    with pytest.raises(ValueError, match="cannot compute"):
        dynamic_conv2d(a["input"], a["weight"], a["routing"], strategy="matmul")
    with pytest.raises(ValueError, match="cannot compute"):
        dynamic_conv2d(a["input"], a["weight"], a["routing"], strategy="single")
    with pytest.raises(ValueError, match="groups"):
        dynamic_conv2d(a["input"], torch.randn(3, 5, 2, 3, 3), a["routing"], groups=2)
