"""dynconv.parameter_groups: one step on a freshly converted model moves every layer's kernel as one on the original.

Each kind parametrises its kernel differently (routing weights 1/2 or 1/K, experts stored
scaled), so without per-role multipliers the same learning rate trains each kind at its own
speed. The kernel's step through its own parameters is compared per layer and per sample
with the original conv's step, under SGD with momentum and L2, and under AdamW.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernels import effective_kernel
from reference import close_enough
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

import convert
import dynconv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from core import module_inputs

KINDS = [("condconv", 4), ("dyconv", 4), ("dynet", 4), ("dcd", 1), ("odconv", 1), ("odconv", 4)]
#: optimizer name for parameter_groups, the torch optimizer, its learning rate and weight decay
OPTIMIZERS = {
    "sgd": (lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9), 0.05, 0.05),
    "adamw": (lambda groups: torch.optim.AdamW(groups, lr=1e-3), 1e-3, 0.5),
}


def small_net() -> nn.Module:
    """A seeded CNN with a dense 3x3, a strided 3x3, a depthwise 3x3 and a 1x1 conv."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def kernel_steps(model: nn.Module, names: list[str], optimizer: torch.optim.Optimizer, x, y) -> dict:
    """Per layer, how far one step moves each sample's kernel through the layer's kernel parameters.

    The routers step too (they are in the optimizer), but the kernel after the step is read with
    the routers as they were: what a router learns is new freedom, not the original's step.
    """
    modules = dict(model.named_modules())
    inputs = module_inputs(model, names, x)
    routers = [p.detach().clone() for p in dynconv.router_parameters(model)]
    with torch.no_grad():
        before = {n: effective_kernel(modules[n], inputs[n]).clone() for n in names}
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    with torch.no_grad():
        for saved, p in zip(routers, dynconv.router_parameters(model), strict=True):
            p.copy_(saved)
        return {n: effective_kernel(modules[n], inputs[n]) - before[n] for n in names}


def relative_differences(kind: str, experts: int, optimizer: str, groups=dynconv.parameter_groups) -> dict:
    """Relative difference, per converted layer, between its kernel step and the original conv's."""
    make, lr, weight_decay = OPTIMIZERS[optimizer]
    result = convert.convert_model(small_net().train(), kind=kind, experts=experts, input_size=16, seed=0)
    names = [record.name for record in result.layers]
    assert len(names) >= 3
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    original, converted = result.reference.train(), result.model.train()
    common = {"lr": lr, "optimizer": optimizer, "weight_decay": weight_decay}
    expected = kernel_steps(original, names, make(dynconv.parameter_groups(original, **common)), x, y)
    actual = kernel_steps(converted, names, make(groups(converted, **common)), x, y)
    return {n: ((actual[n] - expected[n]).norm() / expected[n].norm()).item() for n in names}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize(("kind", "experts"), KINDS, ids=[f"{k}-{e}" for k, e in KINDS])
def test_one_step_moves_every_kernel_as_the_original(kind: str, experts: int, optimizer: str) -> None:
    differences = relative_differences(kind, experts, optimizer)
    assert max(differences.values()) <= 0.10, differences


@pytest.mark.parametrize(("kind", "experts"), KINDS, ids=[f"{k}-{e}" for k, e in KINDS])
def test_the_effective_kernel_is_what_the_layer_applies(kind: str, experts: int) -> None:
    """The measuring stick: one ``F.conv2d`` per sample with ``effective_kernel`` gives the layer's output."""
    torch.manual_seed(2)
    convs = (nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(6, 8, 1))
    for conv in convs:
        conv.bias = None
        layer = dynconv.layer_class(kind).from_conv(conv, experts)
        for p in dynconv.router_parameters(layer):  # routing that depends on the input
            nn.init.normal_(p, std=0.5)
        x = torch.randn(3, conv.in_channels, 7, 7)
        kernels = effective_kernel(layer, x)
        expected = [F.conv2d(x[b : b + 1], kernels[b], None, 1, conv.padding, 1, conv.groups) for b in range(3)]
        assert close_enough(layer(x), torch.cat(expected))


def test_the_multipliers_follow_each_kinds_routing_at_conversion() -> None:
    """SGD: 1 / sum r^2; Adam: 1 / sum r (r: each expert's weight at conversion, times its attentions)."""
    conv = nn.Conv2d(8, 8, 3)
    expected = {
        ("condconv", 4): (1.0, 0.5),
        ("condconv", 8): (0.5, 0.25),
        ("dyconv", 4): (4.0, 1.0),
        ("dynet", 4): (4.0, 1.0),
        ("dcd", 1): (1.0, 1.0),
        ("odconv", 1): (64.0, 8.0),
        ("odconv", 4): (256.0, 8.0),
    }
    for (kind, experts), (sgd, adam) in expected.items():
        layer = dynconv.layer_class(kind).from_conv(conv, experts)
        assert layer.lr_multipliers("sgd")["weight"] == pytest.approx(sgd), kind
        assert layer.lr_multipliers("adam")["weight"] == pytest.approx(adam), kind
    odconv = dynconv.ODConv2d.from_conv(conv, 4)  # its bias is mixed by the kernel softmax alone
    assert odconv.lr_multipliers("sgd")["bias"] == pytest.approx(4.0)
    assert odconv.lr_multipliers("adam")["bias"] == pytest.approx(1.0)


def test_groups_split_decay_name_themselves_and_reject_unknown_optimizers() -> None:
    model = convert.convert_model(small_net(), kind="dyconv", experts=4, input_size=16).model
    groups = dynconv.parameter_groups(model, lr=0.1, optimizer="momentum", weight_decay=1e-4)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    experts = next(g for g in groups if g["name"] == "experts x4 decay")
    assert experts["lr"] == pytest.approx(0.4) and experts["weight_decay"] == pytest.approx(2.5e-5)
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("no_decay"))
    assert all(p.ndim > 1 for g in groups if g["name"].endswith(" decay") for p in g["params"])
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgdx'.*adamw"):
        dynconv.parameter_groups(model, lr=0.1, optimizer="sgdx")


def test_timm_optimizer_and_scheduler_keep_the_multipliers() -> None:
    model = convert.convert_model(small_net(), kind="odconv", experts=1, input_size=16).model
    groups = dynconv.parameter_groups(model, lr=1e-3, optimizer="adamw", weight_decay=0.05)
    optimizer = create_optimizer_v2(groups, opt="adamw", lr=1e-3, weight_decay=0.05)
    scheduler = create_scheduler_v2(optimizer, sched="cosine", num_epochs=10, warmup_epochs=2, warmup_lr=1e-5)[0]
    made = optimizer.param_groups
    assert len(made) == len(groups) and {g["lr_multiplier"] for g in made} >= {8.0, 1.0}
    for epoch in (2, 5, 9):  # after the warm-up, which starts every group at the same warmup_lr
        scheduler.step(epoch)
        base = [g["lr"] / g["lr_multiplier"] for g in made]
        assert base == pytest.approx([base[0]] * len(base)) and base[0] > 0
    decayed = [g for g in made if g["name"] == "experts x8 decay"]
    assert decayed and decayed[0]["weight_decay"] == pytest.approx(0.05 / 8)
