"""convert_model's selection, recipes, weight tying, counting and conv-class adapters."""

from __future__ import annotations

import pytest
import torch
from reference import close_enough
from timm.layers import CondConv2d as TimmCondConv2d
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d, StdConv2dSame
from torch import nn

import convert
import dynconv


class TinyNet(nn.Module):
    """stem -> 3x3 -> depthwise -> pointwise -> SE gate on a pooled map -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.Conv2d(16, 24, 1),
        )
        self.gate = nn.Conv2d(24, 24, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        x = x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        return self.head(x.mean((2, 3)))


class TiedNet(nn.Module):
    """One conv module applied twice, reachable under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.shared
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.shared(self.stem(x)))
        x = torch.relu(self.alias(x))
        return self.head(x.mean((2, 3)))


class CustomForwardConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def x_for(size: int = 16) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_default_selection_and_reasons() -> None:
    result = convert.convert_model(tiny(), input_size=16)
    assert [r.name for r in result.layers] == ["body.0", "body.2", "body.3"]
    reasons = {s.name: s.reason for s in result.skipped}
    assert reasons["stem"].startswith("stem")
    assert "1x1 spatially" in reasons["gate"]
    assert [r.conv_type for r in result.layers] == ["spatial", "depthwise", "pointwise"]
    assert close_enough(result.model(x_for()), tiny()(x_for()))


def test_include_by_exact_name_forces_and_exclude_removes() -> None:
    result = convert.convert_model(tiny(), include=["stem", "re:body\\.[03]"], input_size=16)
    assert [r.name for r in result.layers] == ["stem", "body.0", "body.3"]
    assert {s.name: s.reason for s in result.skipped}["body.2"] == "not matched by the include patterns"
    result = convert.convert_model(tiny(), exclude="body.2", input_size=16)
    assert [r.name for r in result.layers] == ["body.0", "body.3"]
    assert {s.name: s.reason for s in result.skipped}["body.2"] == "excluded by pattern 'body.2'"
    with pytest.raises(convert.SelectionError, match=r"no conv would be converted: all 5 .*3 excluded by pattern"):
        convert.convert_model(tiny(), exclude="body.*", input_size=16)


def test_pattern_matching_nothing_lists_close_names() -> None:
    with pytest.raises(convert.SelectionError, match=r"include pattern 'bodyy\.0'.*close conv names: body\.0"):
        convert.convert_model(tiny(), include="bodyy.0", input_size=16)
    with pytest.raises(convert.SelectionError, match="exclude pattern"):
        convert.convert_model(tiny(), exclude="re:nothing.*", input_size=16)


def test_recipe_rules_precedence_and_skip() -> None:
    recipe = {
        "defaults": {"kind": "dyconv", "experts": 2, "temperature": 10.0},
        "rules": [
            {"match": {"type": "pointwise"}, "experts": 8, "kind": "dynet"},
            {"match": {"name": "body.3"}, "experts": 3},  # later rule wins over the earlier one
            {"match": {"type": "depthwise"}, "skip": True},
            {"match": {"name": "stem"}, "skip": False, "kind": "condconv"},  # re-includes the stem
        ],
    }
    result = convert.convert_model(tiny(), recipe=recipe, input_size=16)
    by_name = {r.name: r for r in result.layers}
    assert set(by_name) == {"stem", "body.0", "body.3"}
    assert (by_name["body.0"].kind, by_name["body.0"].experts) == ("dyconv", 2)
    assert by_name["body.0"].options["temperature"] == 10.0
    assert (by_name["body.3"].kind, by_name["body.3"].experts) == ("dynet", 3)
    assert by_name["stem"].kind == "condconv"
    assert {s.name: s.reason for s in result.skipped}["body.2"] == "skipped by recipe rule 2"


def test_explicit_arguments_override_recipe_defaults_not_rules() -> None:
    recipe = convert.Recipe.from_dict(
        {"defaults": {"kind": "dyconv", "experts": 2}, "rules": [{"match": {"name": "body.3"}, "experts": 6}]}
    )
    result = convert.convert_model(tiny(), recipe=recipe, kind="condconv", experts=5, input_size=16)
    assert {(r.name, r.kind, r.experts) for r in result.layers} == {
        ("body.0", "condconv", 5),
        ("body.2", "condconv", 5),
        ("body.3", "condconv", 6),
    }


def test_selector_criteria() -> None:
    recipe = {"rules": [{"match": {"min_channels": 20}, "skip": True}, {"match": {"stride": 2}, "skip": False}]}
    result = convert.convert_model(tiny(), recipe=recipe, input_size=16)
    assert {r.name for r in result.layers} == {"stem", "body.0", "body.2"}
    skip_big_maps = {"rules": [{"match": {"min_input_size": 9}, "skip": True}]}
    # At 16x16 the body sees 8x8 maps (the stem has stride 2): the rule matches nothing there.
    assert {r.name for r in convert.convert_model(tiny(), recipe=skip_big_maps, input_size=16).layers} == {
        "body.0",
        "body.2",
        "body.3",
    }
    with pytest.raises(convert.SelectionError, match="no conv would be converted"):
        convert.convert_model(tiny(), recipe=skip_big_maps, input_size=32)


def test_weight_tied_conv_is_converted_once_and_stays_shared(tmp_path) -> None:
    torch.manual_seed(0)
    model = TiedNet().eval()
    result = convert.convert_model(model, kind="dyconv", input_size=12)
    (record,) = result.layers
    assert record.name == "shared" and record.aliases == ["alias"]
    assert result.model.shared is result.model.alias
    x = torch.randn(2, 3, 12, 12)
    assert close_enough(result.model(x), model(x))
    path = convert.save_checkpoint(result, tmp_path / "tied.safetensors")
    loaded = convert.load_checkpoint(path, model=TiedNet())
    assert loaded.shared is loaded.alias
    torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=0)


def test_macs_count_the_dynamic_layer_routing_included() -> None:
    conv_model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1))
    result = convert.convert_model(conv_model, kind="condconv", experts=4, input_size=10)
    (record,) = result.layers
    conv_macs = 16 * 10 * 10 * 8 * 9
    assert record.macs_before == conv_macs
    # the convolution + mixing K kernels (K * |W|) and biases (K * C_out) + the router's linear (C_in * K)
    assert record.macs_after == conv_macs + 4 * 16 * 8 * 9 + 4 * 16 + 8 * 4
    assert record.params_after == 4 * (16 * 8 * 9 + 16) + 8 * 4 + 4
    assert result.totals["macs_after"] - result.totals["macs_before"] == record.macs_after - record.macs_before
    assert result.totals["params_ratio"] > 1


def test_already_dynamic_and_custom_forward_convs_are_skipped_with_reasons() -> None:
    hooked = nn.Conv2d(8, 8, 3, padding=1)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        dynconv.CondConv2d(8, 8, 3, padding=1),
        CustomForwardConv(8, 8, 3, padding=1),
        nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3, padding=1)),
        hooked,
        nn.Conv2d(8, 8, 3, padding=1),
    )
    result = convert.convert_model(model, input_size=8, include=["1", "2", "3", "4", "5"])
    reasons = {s.name: s.reason for s in result.skipped}
    assert reasons["1"].startswith("already a dynamic conv")
    assert "has its own forward" in reasons["2"]
    assert "parametrized weight" in reasons["3"]
    assert "hooks" in reasons["4"]
    assert [r.name for r in result.layers] == ["5"]


def test_uncopyable_model_is_refused_clearly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.utils.weight_norm(nn.Conv2d(8, 8, 3)))
    with pytest.raises(ValueError, match="cannot be copied"):
        convert.convert_model(model, input_size=8)


def test_timm_condconv_counts_as_already_dynamic() -> None:
    class WithTimm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.cond = TimmCondConv2d(8, 8, 3, padding=1, num_experts=2)
            self.after = nn.Conv2d(8, 8, 3, padding=1)  # something to convert

        def forward(self, x):
            x = self.conv(x)
            return self.after(self.cond(x, torch.full((x.shape[0], 2), 0.5)))

    result = convert.convert_model(WithTimm(), input_size=8)
    assert {s.name: s.reason for s in result.skipped}["cond"] == "already a dynamic conv (CondConv2d)"
    assert [r.name for r in result.layers] == ["after"]


@pytest.mark.parametrize("kind", ["condconv", "dyconv", "dynet"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: Conv2dSame(8, 16, 3, stride=2),
        lambda: StdConv2d(8, 16, 3, padding=1, eps=1e-8),
        lambda: StdConv2dSame(8, 16, 4, stride=2),
        lambda: ScaledStdConv2d(8, 16, 3, padding=1, gain_init=1.5),
    ],
    ids=["Conv2dSame", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d"],
)
def test_timm_conv_classes_keep_their_behaviour(make, kind, tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), make(), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].weight.mul_(2).add_(0.1)  # not already standardised
    result = convert.convert_model(model, kind=kind, input_size=13)
    assert [r.name for r in result.layers] == ["1"]
    for size in (13, 16):  # TF 'same' padding depends on the input size
        x = torch.randn(2, 3, size, size)
        assert close_enough(result.model(x), model(x)), size
    path = convert.save_checkpoint(result, tmp_path / "m.safetensors")
    loaded = convert.load_checkpoint(path, model=model)
    x = torch.randn(2, 3, 15, 15)
    torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=0)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        convert.convert_model(tiny(), kind="odconv2", input_size=16)
    with pytest.raises(ValueError, match="experts"):
        convert.convert_model(tiny(), experts=0, input_size=16)
    with pytest.raises(convert.ProbeError, match="input size"):
        convert.convert_model(tiny(), input_size=(3, 0, 0))


def test_recipe_validation_errors_name_the_key() -> None:
    with pytest.raises(convert.RecipeError, match=r"rules\[0\]\.experts"):
        convert.Recipe.from_dict({"rules": [{"experts": 0}]})
    with pytest.raises(convert.RecipeError, match=r"defaults\.colour: unknown key"):
        convert.Recipe.from_dict({"defaults": {"colour": "red"}})
    with pytest.raises(convert.RecipeError, match="bad regular expression"):
        convert.Recipe.from_dict({"rules": [{"match": {"name": "re:("}}]})


def test_recipe_yaml_errors_give_file_and_line(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  kind: dyconv\nrules:\n  - match: {type: pointwise}\n    expertz: 3\n")
    with pytest.raises(convert.RecipeError, match=r"bad\.yaml, line 5: rules\[0\]\.expertz: unknown key"):
        convert.Recipe.from_yaml(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("defaults:\n  kind: [dyconv\n")
    with pytest.raises(convert.RecipeError, match=r"broken.yaml, line 3: YAML syntax error"):
        convert.Recipe.from_yaml(broken)
    good = tmp_path / "good.yaml"
    good.write_text("defaults:\n  kind: dynet\n  experts: 2\n")
    result = convert.convert_model(tiny(), recipe=good, input_size=16)
    assert {r.kind for r in result.layers} == {"dynet"}


class TokenNet(nn.Module):
    """Feeds a view of a parameter to a module (PiT/CaiT class tokens), which broke module-tracking counters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.token = nn.Parameter(torch.randn(1, 8, 4, 4))
        self.mix = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = self.mix(self.token.expand(x.shape[0], -1, -1, -1))
        return self.mix(self.stem(x)).mean((2, 3)) + token.mean((2, 3))


def test_macs_are_counted_when_parameter_views_feed_modules() -> None:
    torch.manual_seed(0)
    model = TokenNet().eval()
    result = convert.convert_model(model, kind="dyconv", input_size=4)
    (record,) = result.layers
    assert record.name == "mix" and record.macs_after > record.macs_before > 0
    x = torch.randn(2, 3, 4, 4)
    assert close_enough(result.model(x), model(x))
