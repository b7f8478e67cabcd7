"""Real torchvision and timm models: conversion preserves the function, trains, and round-trips."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from reference import close_enough

import convert
import dynconv
from convert.verify import compare, depends_on_input, output, signal_preserving_init

SIZE = 64
MODELS = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",  # group convs
    "convnext_atto",  # timm, 7x7 depthwise
    "tf_efficientnet_b0",  # timm Conv2dSame (TF 'same' padding)
    "mixnet_s",  # timm MixedConv2d
    "nf_resnet26",  # timm ScaledStdConv2d (weight standardisation with gain)
]
KINDS = ["condconv", "dyconv", "dynet"]


@pytest.fixture(scope="module", params=MODELS)
def base(request) -> torch.nn.Module:
    torch.manual_seed(0)
    model = convert.build_model(request.param).eval()
    if not depends_on_input(output(model, _input())):  # keep the equality checks meaningful
        signal_preserving_init(model)
    return model


def _input() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _forward(model: torch.nn.Module, x: torch.Tensor, train: bool, seed: int = 0) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(seed)  # dropout / drop-path draw the same masks in both models
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("kind", KINDS)
def test_conversion_preserves_function_trains_and_round_trips(base, kind, tmp_path: Path) -> None:
    before = _snapshot(base)
    result = convert.convert_model(base, kind=kind, experts=4, seed=0, input_size=SIZE)
    assert result.layers, "nothing was converted"
    assert all(r.kind == kind and r.experts == 4 for r in result.layers)
    assert all(isinstance(result.model.get_submodule(r.name), dynconv.DynamicConv2d) for r in result.layers)

    x = _input()
    check = compare(base, result.model, x)
    assert check.input_sensitive, "the original's output ignores its input: the check would be vacuous"
    assert check.within_tolerance, f"eval mode differs: max rel diff {check.max_rel:.1e}"
    original_train, converted_train = copy.deepcopy(base), copy.deepcopy(result.model)
    assert close_enough(_forward(converted_train, x, train=True), _forward(original_train, x, train=True)), (
        "train mode differs"
    )

    # The input model is untouched: same tensors, same modules.
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, dynconv.DynamicConv2d) for m in base.modules())

    # Checkpoint round trip: rebuilt from the recorded base name, identical outputs.
    path = convert.save_checkpoint(result, tmp_path / "model.safetensors")
    loaded = convert.load_checkpoint(path)
    assert not loaded.training
    torch.testing.assert_close(_forward(loaded, x, train=False), _forward(result.model, x, train=False), rtol=0, atol=0)

    # Two optimiser steps: every expert trains, and differently from its siblings.
    _train_and_check_experts(result.model, x)


def _train_and_check_experts(model: torch.nn.Module, x: torch.Tensor) -> None:
    layers = dynconv.dynamic_layers(model)
    dynconv.set_temperature(model, 1.0)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    target = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out[:, :10], target)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    separated = 0
    for name, layer in layers.items():
        update = (layer.weight.detach() - before[name]).flatten(1)
        assert (update.abs().sum(1) > 0).all(), f"an expert of {name} did not train"
        separated += bool(((update - update.mean(0)).abs().max() > 0).item())
    assert separated >= len(layers) // 2, f"experts separated in only {separated} of {len(layers)} layers"


def test_same_seed_same_weights_different_seed_different() -> None:
    torch.manual_seed(0)
    model = convert.build_model("resnet18")
    a = convert.convert_model(model, kind="dyconv", seed=5, input_size=SIZE).model.state_dict()
    b = convert.convert_model(model, kind="dyconv", seed=5, input_size=SIZE).model.state_dict()
    c = convert.convert_model(model, kind="dyconv", seed=6, input_size=SIZE).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layer1.0.conv1.weight"], c["layer1.0.conv1.weight"])
    # Layers get different noise from one global seed.
    w = a["layer1.0.conv1.weight"] - a["layer1.0.conv1.weight"].mean(0)
    v = a["layer1.0.conv2.weight"] - a["layer1.0.conv2.weight"].mean(0)
    assert not torch.allclose(w / w.norm(), v / v.norm())


def test_default_selection_reasons_on_efficientnet() -> None:
    torch.manual_seed(0)
    result = convert.convert_model(convert.build_model("efficientnet_b0"), input_size=SIZE)
    reasons = {s.name: s.reason for s in result.skipped}
    assert reasons["features.0.0"].startswith("stem")
    se = [n for n, r in reasons.items() if "squeeze-excite" in r]
    assert se and all(".fc1" in n or ".fc2" in n for n in se)
    converted = {r.name for r in result.layers}
    assert "features.1.0.block.0.0" in converted  # a depthwise conv
    assert {r.conv_type for r in result.layers} == {"depthwise", "pointwise"}
    assert sum(isinstance(m, torch.nn.Conv2d) for m in result.model.modules()) == len(result.skipped)
