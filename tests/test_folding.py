"""BatchNorm folding: exact, graph-proven pairs, every kind, and refusals with reasons."""

from __future__ import annotations

import pytest
import torch
from deploy_models import KINDS, batch, converted_models, routing_varies
from torch import nn

import convert
import dynconv
from convert.folding import FoldError, find_conv_bn_pairs, fold_batchnorm
from convert.verify import compare, signal_preserving_init


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], nn.Module]:
    return converted_models()


# ------------------------------------------------------------------- BatchNorm folding


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_fold_batchnorm_is_exact_and_removes_every_norm(models, name, kind) -> None:
    model = models[(name, kind)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = batch()
    assert routing_varies(model, x)
    result = fold_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(result.folded) == len(norms) and not result.skipped
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    check = compare(model, result.model, x)
    assert check.ok, check
    assert {p.conv for p in result.folded if p.kind == kind} == set(dynconv.dynamic_layers(model))
    for name_, layer in dynconv.dynamic_layers(result.model).items():
        # sigmoid routing does not sum to one: the BatchNorm shift must live outside the experts
        assert (layer.static_bias is not None) == (kind == "condconv"), name_
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the input model changed"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_fold_into_one_layer_matches_conv_then_norm(kind, bias) -> None:
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=bias)
    bn = trained_like_norm(8)
    layer = dynconv.layer_class(kind).from_conv(conv, experts=3)
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(4, 6, 9, 9)
    expected = bn(layer(x))
    dynconv.fold_batchnorm_(layer, bn)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    if kind == "condconv":  # the routing weights of different samples sum to different totals
        totals = layer.route(x).sum(1)
        assert (totals.max() - totals.min()) > 1e-3


def trained_like_norm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(-1.5, 1.5)  # negative scales too
        bn.bias.uniform_(-1, 1)
    return bn


def test_weight_standardised_layer_refuses_to_fold() -> None:
    from dynconv.standardization import WeightStandardization

    layer = dynconv.DyConv2d.from_conv(nn.Conv2d(4, 4, 3), standardize=WeightStandardization())
    weight = layer.weight.clone()
    with pytest.raises(ValueError, match="weight-standardised"):
        dynconv.fold_batchnorm_(layer, trained_like_norm(4))
    assert torch.equal(layer.weight, weight)


def test_timm_batchnorm_act_folds_and_keeps_its_activation() -> None:
    """timm's BatchNormAct2d (BN, drop, act in one module) around TF-'same' convs."""
    import timm

    base = signal_preserving_init(timm.create_model("tf_efficientnet_b0")).eval()
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
                m.running_mean.uniform_(-0.5, 0.5)
    model = convert.convert_model(base, kind="dyconv", experts=2, input_size=64).model
    result = fold_batchnorm(model)
    assert len(result.folded) == 49 and not result.skipped
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert isinstance(result.model.bn1, nn.Sequential) and isinstance(result.model.bn1[1], nn.SiLU)
    assert compare(model, result.model, batch(2)).ok


class Branchy(nn.Module):
    """conv1's output feeds its BatchNorm and a skip; bn2 follows a pool, not a conv; conv3 -> bn3 folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        y = self.bn1(y) + y
        y = self.bn2(self.pool(y))
        return self.bn3(self.conv3(y))


def test_pairs_come_from_the_graph_not_from_names() -> None:
    model = convert.convert_model(Branchy().eval(), kind="dyconv", experts=2, input_size=16).model
    pairs, skipped = find_conv_bn_pairs(model)
    assert pairs == [("conv3", "bn3")]
    reasons = {s.name: s.reason for s in skipped}
    assert "also used elsewhere" in reasons["bn1"]
    assert "not the output of a conv" in reasons["bn2"]
    result = fold_batchnorm(model)
    assert isinstance(result.model.bn3, nn.Identity) and isinstance(result.model.bn1, nn.BatchNorm2d)
    assert compare(model, result.model, torch.randn(2, 3, 16, 16)).ok


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on values: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.conv(x)


def test_untraceable_model_is_refused_with_a_reason() -> None:
    with pytest.raises(FoldError, match=r"does not trace with torch\.fx"):
        fold_batchnorm(DataDependent())


def test_a_folded_model_cannot_be_saved_as_a_checkpoint(models, tmp_path) -> None:
    folded = fold_batchnorm(models[("resnet18", "dyconv")]).model
    with pytest.raises(convert.CheckpointError, match="BatchNorm folded"):
        convert.save_checkpoint(folded, tmp_path / "f.safetensors")
    assert not list(tmp_path.iterdir())
