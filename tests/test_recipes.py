"""Every shipped recipe validates, converts its own model, and preserves the function."""

from __future__ import annotations

import pytest
import torch

import convert
from convert import catalog
from convert.verify import compare, depends_on_input, output, signal_preserving_init

SHIPPED = catalog.shipped_recipes()


def test_the_papers_placements_are_shipped() -> None:
    assert set(SHIPPED) >= {
        "condconv-efficientnet_b0",
        "dyconv-resnet18",
        "dyconv-mobilenet_v2",
        "dynet-mobilenet_v2",
        "late-stages-resnet50",
    }


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_converts_its_model_exactly(name: str) -> None:
    recipe = convert.Recipe.from_yaml(SHIPPED[name])
    assert recipe.description and recipe.model is not None
    torch.manual_seed(0)
    model = convert.build_model(recipe.model.name, recipe.model.source, **recipe.model.kwargs).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    if not depends_on_input(output(model, x)):
        signal_preserving_init(model)
    result = convert.convert_model(model, recipe=recipe, input_size=64)
    assert result.layers
    check = compare(model, result.model, x)
    assert check.ok, check
    kinds = {r.kind for r in result.layers}
    names = [r.name for r in result.layers]
    if name == "condconv-efficientnet_b0":
        assert kinds == {"condconv"} and {r.experts for r in result.layers} == {8}
        assert {n.split(".")[1] for n in names} == {"5", "6", "7"}  # the last three stages only
    elif name == "dyconv-resnet18":
        assert kinds == {"dyconv"} and len(names) == 19  # every conv but the stem
    elif name == "dyconv-mobilenet_v2":  # the paper's count: the last 1x1 conv (320 -> 1280) stays static
        assert kinds == {"dyconv"} and len(names) == 50 and not {"features.0.0", "features.18.0"} & set(names)
    elif name.endswith("mobilenet_v2"):
        assert kinds == {name.split("-")[0]} and len(names) == 51 and "features.0.0" not in names
    elif name == "late-stages-resnet50":
        assert all(
            n.startswith(("layer3", "layer4")) and r.kernel == (3, 3) for n, r in zip(names, result.layers, strict=True)
        )
        assert len(names) == 6 + 3
