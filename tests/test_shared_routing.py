"""Shared routing per block (#15): exact conversions, one router per block, the plan, checkpoints, recipes."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch
from deploy_models import batch, compare_arrays, routing_varies, trained_like
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import convert
import dynconv
from convert import catalog
from convert import checkpoint as checkpoint_module
from convert.cli import app
from convert.verify import compare, signal_preserving_init


def seeded(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return signal_preserving_init(convert.build_model(name, **kwargs)).eval()


def move_routers(model: nn.Module, seed: int = 2) -> nn.Module:
    """Routers off zero (each shared router once) with logits of order one for this model's
    activations, so routing depends on the input without saturating."""
    routers = [m for m in model.modules() if isinstance(m, dynconv.Router)]
    pooled: dict[int, torch.Tensor] = {}
    hooks = [r.register_forward_pre_hook(lambda m, a: pooled.__setitem__(id(m), a[0].mean((2, 3)))) for r in routers]
    with torch.no_grad():
        model.eval()(batch(3))  # routers still zero: only what they read is measured
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in routers:
            features = pooled[id(router)]
            for index, fc in enumerate(m for m in router.modules() if isinstance(m, nn.Linear)):
                weight = torch.randn(fc.weight.shape, generator=gen) / fc.in_features**0.5
                if index == 0:  # centred and scaled on this router's own inputs
                    weight = weight / (float(features.std(0).mean()) + 1e-6)
                    fc.bias.copy_(-weight @ features.mean(0))
                fc.weight.copy_(weight)
    return model


def distinct_routers(model: nn.Module) -> int:
    return len({id(layer.router) for layer in dynconv.dynamic_layers(model).values()})


# model, kind, experts, block type, blocks, converted convs outside any block
CASES = [
    ("efficientnet_b0", "condconv", 4, "MBConv", 16, ["features.8.0"]),
    ("mobilenet_v2", "dyconv", 4, "InvertedResidual", 17, ["features.18.0"]),
    ("resnet50", "condconv", 2, "Bottleneck", 16, []),
]


@functools.cache
def shared_case(name: str) -> tuple[nn.Module, convert.ConversionResult]:
    """The original and its shared-routing conversion (converted once per module run)."""
    kind, experts = next(c[1:3] for c in CASES if c[0] == name)
    torch.manual_seed(0)
    model = trained_like(name)  # BatchNorm statistics that keep activations, and so routing, in range
    return model, convert.convert_model(model, kind=kind, experts=experts, input_size=64, share_routing="block")


@functools.cache
def resnet18_case() -> tuple[nn.Module, convert.ConversionResult]:
    model = seeded("resnet18")
    return model, convert.convert_model(model, experts=2, input_size=64, share_routing="block")


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def shared(request):
    return (*shared_case(request.param[0]), request.param)


def test_shared_conversion_is_exact_and_runs_one_router_per_block(shared) -> None:
    model, result, (_, _, _, block_type, blocks, outside) = shared
    check = compare(model, result.model, batch(3))
    assert check.ok, check
    plan = result.sharing
    assert plan is not None and len(plan.groups) == blocks
    assert {g.block_type for g in plan.groups} == {block_type}
    assert [u.name for u in plan.unshared] == outside
    assert all(u.reason.startswith("outside every block: features (Sequential)") for u in plan.unshared)
    grouped = [n for g in plan.groups for n in g.layers]
    assert sorted(grouped + outside) == sorted(r.name for r in result.layers)
    assert distinct_routers(result.model) == blocks + len(outside) == result.totals["routers"]
    assert result.totals["routers"] < result.totals["converted"]
    for group in plan.groups:  # one router module per block, reached from every member
        layers = [result.model.get_submodule(n) for n in group.layers]
        assert all(layer.router is layers[0].router for layer in layers)
        assert group.layers[0].startswith(group.block + ".")


def test_every_member_uses_the_router_output_for_the_block_input(shared) -> None:
    _, result, _ = shared
    model = move_routers(result.model)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(g.block).register_forward_pre_hook(lambda m, a, n=g.block: inputs.__setitem__(n, a[0]))
        for g in result.sharing.groups
    ]
    x = batch(3)
    with dynconv.capture_routing(model) as routing, torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert routing_varies(model, x)
    for group in result.sharing.groups:
        leader = model.get_submodule(group.layers[0])
        with torch.no_grad():
            expected = leader.router(inputs[group.block])
        for name in group.layers:
            assert torch.equal(routing[name], expected), name
    follower = model.get_submodule(result.sharing.groups[0].layers[1])
    with pytest.raises(RuntimeError, match="has not run in this forward"):
        follower(torch.randn(1, follower.in_channels, 8, 8))


def test_shared_router_trains_once_from_every_member() -> None:
    converted = copy.deepcopy(move_routers(resnet18_case()[1].model)).train()
    routers = list(dynconv.router_parameters(converted))
    assert len({id(p) for p in routers}) == len(routers)  # each shared router listed once
    assert len(routers) == 2 * 8  # 8 BasicBlocks, one linear layer with weight and bias each
    converted(batch(4)).logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about a parameter listed twice in a group
        torch.optim.SGD(dynconv.parameter_groups(converted, router_lr_scale=10, lr=0.1)).step()


def test_shared_routing_traces_with_fx_and_exports_with_a_dynamic_batch() -> None:
    model = move_routers(resnet18_case()[1].model)
    traced = torch.fx.symbolic_trace(model)
    program = torch.export.export(model, (batch(2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for n in (1, 5):
        x = batch(n)
        with torch.no_grad():
            expected = model(x)
            assert compare_arrays(traced(x), expected)
            assert compare_arrays(program.module()(x), expected)


def test_dynet_keeps_its_routers_and_says_why_and_rules_can_opt_out() -> None:
    model = resnet18_case()[0]
    early = ["layer1.*", "layer2.*"]
    dynet = convert.convert_model(model, kind="dynet", experts=2, input_size=64, include=early, share_routing="block")
    assert not dynet.sharing.groups and len(dynet.sharing.blocks) == 4
    assert len(dynet.sharing.unshared) == len(dynet.layers) == dynet.totals["routers"]
    assert all("per output channel" in u.reason for u in dynet.sharing.unshared)
    recipe = {
        "defaults": {"kind": "condconv", "experts": 2, "share_routing": "block"},
        "rules": [{"match": {"name": "layer4.*"}, "share_routing": "none"}],
    }
    mixed = convert.convert_model(model, recipe=recipe, include=["layer3.*", "layer4.*"], input_size=64)
    assert [g.block for g in mixed.sharing.groups] == ["layer3.0", "layer3.1"]
    assert not mixed.sharing.unshared  # layer4 was not asked to share: nothing to explain
    assert mixed.totals["routers"] == 2 + 5  # layer4: 2 + 2 convs and a downsample, each its own
    with pytest.raises(convert.UserError, match="share_routing must be one of"):
        convert.convert_model(model, share_routing="stage")


def test_timm_edge_and_inverted_residuals_are_blocks() -> None:
    model = seeded("efficientnet_es")
    include = ["blocks.1.*", "blocks.5.*"]  # EdgeResidual and InvertedResidual stages
    result = convert.convert_model(model, experts=2, input_size=64, include=include, share_routing="block")
    assert compare(model, result.model, batch(3)).ok
    types = [g.block_type for g in result.sharing.groups]
    assert types == ["EdgeResidual"] * 2 + ["InvertedResidual"] * 2, result.sharing.groups


def test_checkpoint_round_trip_keeps_the_shared_routers(tmp_path) -> None:
    result = shared_case("mobilenet_v2")[1]
    model = move_routers(result.model)
    path = convert.save_checkpoint(model, tmp_path / "shared.safetensors")
    meta = convert.read_metadata(path)
    assert meta["format_version"] == convert.checkpoint.FORMAT_VERSION
    assert [g["layers"] for g in meta["sharing"]] == [g.layers for g in result.sharing.groups]
    loaded = convert.load_checkpoint(path, model=shared_case("mobilenet_v2")[0])
    assert distinct_routers(loaded) == distinct_routers(model) == result.totals["routers"]
    x = batch(3)
    assert routing_varies(model, x)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    again = convert.save_checkpoint(loaded, tmp_path / "again.safetensors")
    again = convert.load_checkpoint(again, model=shared_case("mobilenet_v2")[0])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_format_1_checkpoints_still_load(tmp_path) -> None:
    from cli_models import small_net

    torch.manual_seed(0)
    base = small_net()
    result = convert.convert_model(base, experts=2, input_size=16, include=["0", "2"])
    path = convert.save_checkpoint(result, tmp_path / "new.safetensors")
    meta = convert.read_metadata(path)
    tensors = checkpoint_module._read_tensors(path)
    structure = {k: v for k, v in meta.items() if k != "digest"} | {"format_version": 1}
    digest = {"algorithm": "sha256", "value": checkpoint_module._digest(tensors, structure)}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"dynconv": json.dumps({**structure, "digest": digest})})
    loaded = convert.load_checkpoint(old, model=base)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))


@pytest.mark.parametrize(("experts", "params", "macs"), [(4, 13.3e6, 402e6), (8, 24.0e6, 413e6)])
def test_condconv_efficientnet_b0_recipe_matches_the_papers_table(experts, params, macs) -> None:
    recipe = convert.Recipe.from_yaml(catalog.shipped_recipes()["condconv-efficientnet_b0"])
    assert recipe.defaults.share_routing == "block"
    result = convert.convert_model(seeded("efficientnet_b0"), recipe=recipe, experts=experts, input_size=224)
    assert abs(result.params_after / params - 1) <= 0.02, result.params_after
    assert abs(result.macs_after / macs - 1) <= 0.10, result.macs_after
    assert len(result.sharing.groups) == result.totals["routers"] == 3 + 4 + 1  # the blocks of features.5-7


def test_dyconv_mobilenet_v2_recipe_counts_what_the_paper_counts() -> None:
    recipe = convert.Recipe.from_yaml(catalog.shipped_recipes()["dyconv-mobilenet_v2"])
    result = convert.convert_model(seeded("mobilenet_v2"), recipe=recipe, input_size=64)
    assert abs(result.params_after / 11.1e6 - 1) <= 0.02, result.params_after
    assert "features.18.0" in {s.name for s in result.skipped}


def test_cli_share_routing_shows_the_plan_and_refuses_a_bad_mode() -> None:
    runner = CliRunner()
    args = ["convert", "resnet18", "--experts", "2", "--input-size", "64", "--dry-run", "--include", "layer4.*"]
    shown = runner.invoke(app, [*args, "--share-routing", "block", "--json"])
    assert shown.exit_code == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert len(data["sharing"]["groups"]) == 2 and data["totals"]["routers"] == 2
    assert all(b["reason"].startswith("BasicBlock runs") for b in data["sharing"]["blocks"])
    assert data["sharing"]["groups"][0]["layers"] == ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0"]
    table = runner.invoke(app, [*args, "--share-routing", "block", "--no-verify"])
    assert table.exit_code == 0 and "Shared routing (2 blocks" in table.stdout
    bad = runner.invoke(app, [*args, "--share-routing", "stage"])
    assert bad.exit_code == 2 and "--share-routing must be one of none, block" in bad.stderr


class PreActivation(nn.Module):
    """A pre-activation residual block: its first conv reads norm(x), not x, so it is no block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(self.norm(x)))))


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


def test_pre_activation_and_repeated_blocks_keep_their_routers_with_the_reason() -> None:
    torch.manual_seed(0)
    repeated = Residual(8)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), Residual(8), PreActivation(8), repeated, repeated, nn.Flatten(), nn.LazyLinear(3)
    )
    model(torch.randn(1, 3, 8, 8))
    model.eval()
    result = convert.convert_model(model, experts=2, input_size=8, share_routing="block")
    assert compare(model, result.model, torch.randn(3, 3, 8, 8)).ok
    plan = result.sharing
    assert [(g.block, g.block_type, g.layers) for g in plan.groups] == [("1", "Residual", ["1.conv1", "1.conv2"])]
    reasons = {u.name: u.reason for u in plan.unshared}
    assert set(reasons) == {"2.conv1", "2.conv2", "3.conv1", "3.conv2"}
    assert "2 (PreActivation)" in reasons["2.conv1"] and "reads a transformed input" in reasons["2.conv1"]
    assert "3 (Residual)" in reasons["3.conv1"] and "called 2 times" in reasons["3.conv1"]
    assert result.totals["routers"] == 5


def test_a_kind_declares_why_it_cannot_share_its_routing() -> None:
    from dynconv.shared_routing import sharing_refusal

    class KeepsItsRouting(dynconv.CondConv2d):
        routing_unshareable = "keeps its routing to itself"

    conv = nn.Conv2d(4, 4, 3)
    assert sharing_refusal(dynconv.CondConv2d.from_conv(conv)) is None
    assert sharing_refusal(KeepsItsRouting.from_conv(conv)) == "condconv keeps its routing to itself"
