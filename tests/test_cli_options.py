"""Options a kind does not take are refused alike by the CLI, recipes and the API; kinds in any case;
``dynconv kinds`` fits the terminal. Through the installed ``dynconv`` script where it is the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import convert
import dynconv as dynconv_layers
from convert.errors import UserError
from convert.recipe import Recipe, RecipeError

ROOT = Path(__file__).resolve().parent.parent


def dynconv(*args: object, columns: int = 80, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed ``dynconv`` script running this checkout, at ``columns`` wide, without a terminal."""
    exe = shutil.which("dynconv") or str(Path(sys.executable).parent / "dynconv")
    assert Path(exe).exists(), "the dynconv console script is not installed"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": str(columns), "OMP_NUM_THREADS": "2"}
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def two_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))


def test_cli_refuses_experts_for_a_kind_without_experts(tmp_path) -> None:
    done = dynconv("convert", "resnet18", "--kind", "dcd", "--experts", "8", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert message.startswith("error: kind dcd does not take experts") and "Traceback" not in message
    assert "dcd takes latent, reduction, min_hidden" in message  # what it does take
    assert len(message.splitlines()) == 1 and list(tmp_path.iterdir()) == []  # one sentence, nothing written


def test_cli_kind_is_case_insensitive(tmp_path) -> None:
    done = dynconv("convert", "resnet18", "--kind", "DyConv", "--input-size", 32, "--dry-run", "--no-verify", "--json")
    assert done.returncode == 0, done.stderr
    assert '"kind": "dyconv"' in done.stdout


def test_api_refuses_experts_for_dcd_and_reads_kinds_in_any_case() -> None:
    with pytest.raises(UserError, match="kind dcd does not take experts"):
        convert.convert_model(two_convs(), kind="dcd", experts=8, input_size=16)
    with pytest.raises(UserError, match="kind condconv does not take temperature"):
        convert.convert_model(two_convs(), recipe={"defaults": {"temperature": 5.0}}, input_size=16)
    result = convert.convert_model(two_convs(), kind="ODConv", experts=2, input_size=16)
    assert {layer.kind for layer in result.layers} == {"odconv"}


def test_recipe_refuses_an_option_its_kind_does_not_take() -> None:
    with pytest.raises(RecipeError, match="defaults: kind dcd does not take experts"):
        Recipe.from_dict({"defaults": {"kind": "dcd", "experts": 8}})
    rule = {"match": {"name": "0"}, "kind": "condconv", "temperature": 3.0}
    with pytest.raises(RecipeError, match=r"rules\[0\]: kind condconv does not take temperature"):
        Recipe.from_dict({"defaults": {"kind": "dyconv"}, "rules": [rule]})
    # one recipe may mix kinds: an option reaches the convs a rule switches to a kind that takes it
    mixed = Recipe.from_dict({"defaults": {"kind": "CondConv", "temperature": 3.0}, "rules": [{"kind": "DyConv"}]})
    assert mixed.defaults.kind == "condconv" and mixed.rules[0].kind == "dyconv"


def test_recipe_file_with_experts_for_dcd_is_refused_by_the_cli(tmp_path) -> None:
    recipe = tmp_path / "dcd.yaml"
    recipe.write_text("defaults: {kind: DCD, experts: 8}\n")
    done = dynconv("convert", "resnet18", "--recipe", recipe, cwd=tmp_path)
    assert done.returncode == 2 and "kind dcd does not take experts" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcd.yaml"]


@pytest.mark.parametrize("columns", [60, 80])
def test_kinds_fits_the_terminal(columns: int) -> None:
    done = dynconv("kinds", columns=columns)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns, [line for line in lines if len(line) > columns]
    text = " ".join(done.stdout.split())
    for name, cls in dynconv_layers.LAYERS.items():  # nothing lost to the wrapping
        assert f"{name} " in text and f"(dynconv.{cls.__name__})" in text
