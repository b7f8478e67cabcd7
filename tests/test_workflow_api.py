"""Issue 13, the library side: models the user built rebuild by name, a new classifier head,
and a selection that says what it does (include narrows, nothing converted, true skip reasons,
every unmatched pattern at once)."""

from __future__ import annotations

import copy
import sys

import pytest
import timm
import torch
import torchvision
from reference import close_enough
from torch import nn

import convert
from convert.converter import ConversionWarningCategory
from convert.export import ExportDependencyError, _onnxruntime


def _x(size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


def _round_trip(model: nn.Module, tmp_path, include: str, **options) -> tuple[convert.ConversionResult, nn.Module]:
    """Convert a few convs (enough: the rebuild does not depend on which), save, and load back by name."""
    result = convert.convert_model(model, experts=2, input_size=64, include=include, **options)
    path = convert.save_checkpoint(result, tmp_path / "m.safetensors")
    return result, convert.load_checkpoint(path)  # no model=: rebuilt from the recorded name


BUILT = [
    ("torchvision", "resnet18", {}, lambda: torchvision.models.resnet18(), "layer1.0.*"),
    (
        "torchvision",
        "mobilenet_v3_small",
        {"num_classes": 10},
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        "features.1.*",
    ),
    (
        "timm",
        "resnet10t",
        {"num_classes": 7, "drop_rate": 0.2},
        lambda: timm.create_model("resnet10t", num_classes=7, drop_rate=0.2),
        "layer1.*",
    ),
]


@pytest.mark.parametrize(("source", "name", "kwargs", "build", "include"), BUILT, ids=[f"{b[1]}-{b[2]}" for b in BUILT])
def test_models_built_directly_rebuild_by_name(source, name, kwargs, build, include, tmp_path) -> None:
    torch.manual_seed(0)
    model = build().eval()
    result, loaded = _round_trip(model, tmp_path, include)
    assert result.base == convert.ModelSource(source=source, name=name, kwargs=kwargs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), result.model.eval()(_x()))
        assert close_enough(loaded(_x()), model(_x()))


def test_changed_zoo_models_and_own_code_stay_custom(tmp_path) -> None:
    torch.manual_seed(0)
    changed = torchvision.models.resnet18()
    changed.fc = nn.Sequential(nn.Dropout(0.1), nn.Linear(512, 3))  # not what any builder makes
    result = convert.convert_model(changed.eval(), experts=2, input_size=64, include="layer1.0.*")
    assert result.base.source == "custom" and result.base.name == "torchvision.models.resnet:ResNet"
    path = convert.save_checkpoint(result, tmp_path / "changed.safetensors")
    with pytest.raises(convert.CheckpointError, match=r"custom model .*pass model=") as error:
        convert.load_checkpoint(path)
    assert error.value.cli_hint == "--model package.module:factory"
    loaded = convert.load_checkpoint(path, model=changed)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), result.model.eval()(_x()))


HEADS = [
    ("resnet18 fc", lambda: torchvision.models.resnet18(), ["fc"], "layer1.0.*"),
    ("mobilenet_v3_small classifier[-1]", torchvision.models.mobilenet_v3_small, ["classifier.3"], "features.1.*"),
    ("timm reset_classifier", lambda: timm.create_model("resnet10t"), ["fc"], "layer1.*"),
]


@pytest.mark.parametrize(("what", "build", "layers", "include"), HEADS, ids=[h[0] for h in HEADS])
def test_num_classes_gives_a_new_head_recorded_in_the_checkpoint(what, build, layers, include, tmp_path) -> None:
    torch.manual_seed(0)
    model = build().eval()
    result, loaded = _round_trip(model, tmp_path, include, num_classes=10)
    assert result.head == {"num_classes": 10, "layers": layers}
    with torch.no_grad():
        assert model(_x()).shape == (2, 1000), "the input model was modified"
        assert result.model(_x()).shape == (2, 10)
        assert close_enough(result.model(_x()), result.reference(_x()))  # exact: same features, same new head
        torch.testing.assert_close(loaded(_x()), result.model(_x()))
    meta = convert.read_metadata(tmp_path / "m.safetensors")
    assert (
        meta["head"]["num_classes"] == 10
        and meta["base"]["kwargs"] == {}
        and meta["format_version"] == convert.checkpoint.FORMAT_VERSION
    )
    again = copy.deepcopy(model)
    assert convert.replace_head(again, 10, seed=0) == layers  # the same seed gives the same head
    assert torch.equal(again.get_submodule(layers[0]).weight, result.model.get_submodule(layers[0]).weight)


def test_a_model_without_a_known_head_is_refused_clearly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(convert.HeadError, match="cannot find the classifier head of this Sequential"):
        convert.convert_model(model, input_size=16, num_classes=3)
    with pytest.raises(convert.HeadError, match="positive integer"):
        convert.convert_model(torchvision.models.resnet18(), input_size=32, num_classes=0)


def test_an_include_glob_keeps_the_default_skips_and_an_exact_name_forces() -> None:
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0().eval()
    result = convert.convert_model(model, experts=2, include="features.5.*", input_size=64)
    gates = {s.name: s for s in result.skipped if s.name.startswith("features.5") and ".block.2." in s.name}
    assert len(gates) == 6  # fc1 and fc2 of three squeeze-excite blocks
    assert all("squeeze-excite" in s.reason and s.default for s in gates.values())
    assert all(r.input_hw != (1, 1) for r in result.layers) and len(result.layers) == 9
    forced = convert.convert_model(model, experts=2, include=["features.5.0.block.2.fc1"], input_size=64)
    assert [r.name for r in forced.layers] == ["features.5.0.block.2.fc1"]
    assert close_enough(forced.model(_x(64)), model(_x(64)))


def test_a_selection_that_converts_nothing_is_an_error_that_says_why() -> None:
    model = torchvision.models.resnet18().eval()
    with pytest.raises(convert.SelectionError, match=r"no conv would be converted: all 20 .*excluded by pattern"):
        convert.convert_model(model, include="layer4.*", exclude="layer4.*", input_size=32)
    assert isinstance(convert.SelectionError("x"), convert.UserError)


def test_a_probe_size_that_shrinks_maps_to_one_pixel_says_so() -> None:
    model = torchvision.models.resnet18().eval()
    with pytest.warns(ConversionWarningCategory, match=r"shrinks to 1x1 before 3 conv.*layer4\.0\.conv2"):
        result = convert.convert_model(model, experts=2, input_size=32, include="layer4.*")
    reasons = {s.name: s.reason for s in result.skipped}
    assert [r.name for r in result.layers] == ["layer4.0.conv1", "layer4.0.downsample.0"]  # 2x2 inputs
    for name in ("layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"):
        assert "shrunk to one pixel" in reasons[name] and "squeeze-excite" not in reasons[name]
    assert [w.cli_hint for w in result.warnings] == ["--input-size"]
    assert convert.convert_model(model, experts=2, input_size=64, include="layer4.*").warnings == []


def test_every_unmatched_recipe_pattern_is_reported_at_once_with_counts() -> None:
    recipe = {
        "rules": [
            {"match": {"name": "layer1.*"}, "experts": 3},
            {"match": {"name": "layer5.*"}, "skip": True},
            {"match": {"type": "depthwise"}, "skip": True},
            {"match": {"name": ["layer2.0.conv1", "layr3.0.conv2"]}, "kind": "dyconv"},
        ]
    }
    model = torchvision.models.resnet18().eval()
    with pytest.raises(convert.SelectionError) as error:
        convert.convert_model(model, recipe=recipe, input_size=32)
    message = str(error.value)
    assert "recipe rule 1 pattern 'layer5.*' matches no conv" in message
    assert (
        "recipe rule 3 pattern 'layr3.0.conv2' matches no conv in the model (close conv names: layer3.0.conv2"
        in message
    )
    assert "rule 0 4, rule 1 0, rule 2 0, rule 3 1" in message
    recipe["rules"] = [recipe["rules"][0], recipe["rules"][2]]
    with pytest.warns(ConversionWarningCategory, match=r"recipe rule 1 \(type=depthwise\) matches no conv"):
        result = convert.convert_model(model, recipe=recipe, input_size=64, include="layer1.0.*")
    assert [(r.index, r.match, r.action, r.convs) for r in result.rules] == [
        (0, "name=layer1.*", "experts=3", 4),
        (1, "type=depthwise", "skip", 0),
    ]


def test_the_export_extra_message_names_every_missing_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportDependencyError, match=r"export extra, and onnxscript, onnxruntime are missing") as e:
        _onnxruntime()
    assert 'pip install -e ".[export]"' in str(e.value)
