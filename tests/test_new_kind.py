"""A kind is one file under dynconv/layers/ plus ``register``: recipes, CLI, kinds and checkpoints take it as is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import torch
from reference import close_enough
from typer.testing import CliRunner

import convert
import dynconv
from convert.cli import app
from dynconv import Bounds, DynamicConv2d, KindInfo
from dynconv.routing import SoftmaxRouter

TESTS = Path(__file__).resolve().parent
runner = CliRunner()


class ThrowawayConv2d(DynamicConv2d):
    """A kind written for this test: DyConv's softmax routing with a fixed hidden width."""

    kind = "throwaway"
    info = KindInfo(
        title="Throwaway (this test)",
        formula="W(x) = sum_k softmax(z(x))_k W_k",
        routing="global average pool -> hidden -> softmax",
        parameters="K x the kernel",
        speed="as DyConv",
    )

    def _build_router(
        self,
        hidden: Annotated[int, Bounds(ge=1, le=64)] = 8,
        temperature: Annotated[float, Bounds(gt=0)] = 1.0,
    ) -> SoftmaxRouter:
        return SoftmaxRouter(
            self.in_channels, self.experts, reduction=10**6, min_hidden=hidden, temperature=temperature
        )


@pytest.fixture
def throwaway():
    dynconv.register(ThrowawayConv2d)
    yield ThrowawayConv2d
    del dynconv.LAYERS["throwaway"]


def _net() -> torch.nn.Module:
    sys.path.insert(0, str(TESTS))
    from cli_models import small_net

    return small_net(8).eval()


def test_a_registered_kind_converts_through_a_recipe_and_round_trips(throwaway, tmp_path) -> None:
    model = _net()
    recipe = {"defaults": {"kind": "throwaway", "hidden": 5}, "rules": [{"match": {"name": "0"}, "skip": False}]}
    result = convert.convert_model(model, recipe, experts=3, input_size=16)
    layers = dynconv.dynamic_layers(result.model)
    assert {type(m) for m in layers.values()} == {ThrowawayConv2d} and len(layers) == 2
    assert all(m.router.fc1.out_features == 5 for m in layers.values())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert close_enough(result.model(x), model(x))
    path = tmp_path / "t.safetensors"
    convert.save_checkpoint(result, path)
    loaded = convert.load_checkpoint(path, model=_net())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=0)


def test_the_recipe_schema_checks_a_new_kinds_options(throwaway) -> None:
    with pytest.raises(convert.RecipeError, match=r"defaults\.hidden: Input should be less than or equal to 64"):
        convert.Recipe.from_dict({"defaults": {"kind": "throwaway", "hidden": 65}})
    with pytest.raises(convert.RecipeError, match=r"defaults\.kind: unknown kind 'throwaway2'"):
        convert.Recipe.from_dict({"defaults": {"kind": "throwaway2"}})


def test_without_registration_the_kind_is_unknown() -> None:
    with pytest.raises(convert.RecipeError, match="unknown kind 'throwaway'"):
        convert.Recipe.from_dict({"defaults": {"kind": "throwaway"}})


def test_the_cli_takes_a_registered_kind(throwaway, tmp_path) -> None:
    sys.path.insert(0, str(TESTS))
    out = tmp_path / "cli.safetensors"
    args = ["convert", "cli_models:small_net", "--kind", "throwaway", "--input-size", "16", "-o", out]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    assert {r["kind"] for r in convert.read_metadata(out)["layers"]} == {"throwaway"}
    listing = runner.invoke(app, ["kinds"])
    assert listing.exit_code == 0 and "throwaway  Throwaway (this test)" in listing.stdout
    assert "hidden=8, temperature=1.0" in listing.stdout


KIND_FILE = '''
"""A kind added as one file in dynconv/layers/, with no other edit anywhere."""

from typing import Annotated

from ..routing import SoftmaxRouter
from .base import DynamicConv2d
from .registry import register
from .spec import Bounds, KindInfo


@register
class OneFileConv2d(DynamicConv2d):
    kind = "onefile"
    info = KindInfo(
        title="One file (this test)",
        formula="W(x) = sum_k softmax(z(x))_k W_k",
        routing="global average pool -> hidden -> softmax",
        parameters="K x the kernel",
        speed="as DyConv",
    )

    def _build_router(self, hidden: Annotated[int, Bounds(ge=1, le=64)] = 6) -> SoftmaxRouter:
        return SoftmaxRouter(self.in_channels, self.experts, reduction=10**6, min_hidden=hidden)
'''


def test_a_kind_is_one_new_file_with_no_other_edit(tmp_path) -> None:
    """Copy the packages, add one file under dynconv/layers/, and the CLI lists, converts and loads the kind."""
    root = TESTS.parent
    for package in ("dynconv", "convert"):
        shutil.copytree(root / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "dynconv" / "layers" / "onefile.py").write_text(KIND_FILE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS)])}
    out = tmp_path / "onefile.safetensors"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "convert.cli", *args], env=env, cwd=tmp_path, capture_output=True, text=True
        )

    listing = cli("kinds")
    assert listing.returncode == 0, listing.stderr
    assert "One file (this test)" in listing.stdout and "hidden=6" in listing.stdout
    made = cli("convert", "cli_models:small_net", "--kind", "onefile", "--input-size", "16", "-o", str(out))
    assert made.returncode == 0, made.stderr
    checked = cli("inspect", str(out), "--json")
    assert checked.returncode == 0, checked.stderr
    assert {layer["kind"] for layer in json.loads(checked.stdout)["layers"]} == {"onefile"}
