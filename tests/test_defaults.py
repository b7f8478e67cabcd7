"""Each conversion default is written once: changed there, the CLI help, the recipe schema and convert_model follow.

The test copies the two packages, edits each default in the one line that defines it, and
reads the help, the schema and a conversion from the copy in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from convert.plan import layer_seed

ROOT = Path(__file__).resolve().parents[1]

#: (file, the one line defining a default, the same line with a new default)
EDITS = [
    ("dynconv/experts.py", "DEFAULT_EXPERTS = 4\n", "DEFAULT_EXPERTS = 3\n"),
    ("dynconv/experts.py", "DEFAULT_NOISE = 0.1\n", "DEFAULT_NOISE = 0.07\n"),
    ("convert/options.py", 'kind: str = _opt("condconv",', 'kind: str = _opt("dynet",'),
    ("convert/options.py", "seed: int = _opt(0,", "seed: int = _opt(5,"),
    ("dynconv/layers/dyconv.py", "temperature: Annotated[float, Bounds(gt=0)] = 30.0", "temperature: float = 25.0"),
]

SCRIPT = r"""
import json
import torch
from torch import nn
from typer.testing import CliRunner
import convert
from convert.cli import app
from convert.recipe import recipe_json_schema

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()  # the stem stays static
plain = convert.convert_model(model, input_size=16)
dyconv = convert.convert_model(model, kind="dyconv", input_size=16)
schema = recipe_json_schema()["$defs"]["Defaults"]["properties"]
print(json.dumps({
    "file": convert.__file__,
    "help": CliRunner().invoke(app, ["convert", "--help"]).output,
    "schema": {name: field.get("description") for name, field in schema.items()},
    "kind": plain.layers[0].kind,
    "experts": plain.layers[0].experts,
    "noise": plain.layers[0].noise,
    "seed": plain.recipe["seed"],
    "layer_seed": plain.layers[0].seed,
    "temperature": dyconv.layers[0].options["temperature"],
}))
"""


def _edited_copy(tmp_path: Path) -> Path:
    """The ``dynconv`` and ``convert`` packages under ``tmp_path`` with every default of :data:`EDITS` changed."""
    for package in ("dynconv", "convert"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    for file, old, new in EDITS:
        path = tmp_path / file
        text = path.read_text()
        assert text.count(old) == 1, f"{old!r} is not written exactly once in {file}"
        path.write_text(text.replace(old, new))
    return tmp_path


def test_each_default_is_defined_once_and_everything_follows_it(tmp_path: Path) -> None:
    root = _edited_copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "250", "TERMINAL_WIDTH": "250"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["file"].startswith(str(root))
    for text in ("experts per layer (default 3)", "(default 0.07)", "(default 5)", "(default dynet)"):
        assert text in seen["help"]
    schema = seen["schema"]
    assert schema["experts"].endswith("(default 3)")
    assert schema["noise"].endswith("(default 0.07)")
    assert schema["seed"].endswith("(default 5)")
    assert schema["kind"].endswith("(default dynet)")
    assert "dyconv 25.0" in schema["temperature"]
    assert (seen["kind"], seen["experts"], seen["noise"], seen["seed"]) == ("dynet", 3, 0.07, 5)
    assert seen["layer_seed"] == layer_seed(5, "2")
    assert seen["temperature"] == 25.0
