"""dynconv.training: parameters split by role (routers, experts, the rest), on layers built directly."""

from __future__ import annotations

import torch
from torch import nn

import dynconv


def _model() -> nn.Module:
    """Two dynamic layers of different kinds between ordinary modules."""
    return nn.Sequential(
        dynconv.CondConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=1), experts=3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        dynconv.DyConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), experts=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_training_helpers_split_parameters_by_role() -> None:
    model = _model()
    counts = dynconv.set_trainable(model, routers=True, experts=False, rest=False)
    assert counts["routers"] > 0 and counts["experts"] > counts["routers"] and counts["rest"] > 0
    assert all(p.requires_grad for p in dynconv.router_parameters(model))
    assert not any(p.requires_grad for p in dynconv.expert_parameters(model))
    assert not any(p.requires_grad for p in dynconv.other_parameters(model))
    groups = dynconv.parameter_groups(model, router_lr_scale=10.0, lr=0.1)
    assert [g["lr"] for g in groups] == [1.0, 1.0] and all(g["name"].startswith("routers") for g in groups)
    dynconv.set_trainable(model, routers=True, experts=True, rest=True)
    total = sum(p.numel() for p in model.parameters())
    assert sum(sum(p.numel() for p in g["params"]) for g in dynconv.parameter_groups(model, lr=0.1)) == total


def test_the_roles_cover_every_parameter_once() -> None:
    model = _model()
    roles = [
        *dynconv.router_parameters(model),
        *dynconv.expert_parameters(model),
        *dynconv.other_parameters(model),
    ]
    assert len({id(p) for p in roles}) == len(roles) == len(list(model.parameters()))
    layer = model[0]
    assert {id(p) for p in layer.router_parameters()} == {id(p) for p in layer.router.parameters()}
    assert {id(p) for p in layer.expert_parameters()} == {id(layer.weight), id(layer.bias)}


def test_a_router_only_step_leaves_the_experts_and_the_rest_alone() -> None:
    model = _model().train()
    dynconv.set_trainable(model, routers=True, experts=False, rest=False)
    experts = [p.detach().clone() for p in dynconv.expert_parameters(model)]
    routers = [p.detach().clone() for p in dynconv.router_parameters(model)]
    optimizer = torch.optim.SGD(dynconv.parameter_groups(model, lr=0.5), lr=0.5)
    x = torch.randn(4, 3, 8, 8) + torch.linspace(-1, 1, 4).view(4, 1, 1, 1)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(experts, dynconv.expert_parameters(model), strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(routers, dynconv.router_parameters(model), strict=True))
