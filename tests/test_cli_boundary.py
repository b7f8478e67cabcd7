"""The CLI's error boundary: bugs exit 1 with one line (``--debug``: the traceback); bad input exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import convert
from convert.cli import app

TESTS = Path(__file__).resolve().parent
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A converted resnet18 checkpoint (rebuildable by name), small probe size."""
    path = tmp_path_factory.mktemp("boundary") / "r18.safetensors"
    result = convert.convert_model(convert.build_model("resnet18"), experts=2, input_size=32)
    convert.save_checkpoint(result, path)
    return path


def _boom(error: type[Exception]):
    def raise_it(*args: object, **kwargs: object) -> None:
        raise error("boom from a patched function")

    return raise_it


def _commands(checkpoint: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each command with arguments that pass every input check, and a function it calls."""
    return {
        "convert": (["convert", "resnet18", "--input-size", "32", "-o", str(tmp_path / "c.safetensors")], "randn"),
        "verify": (["verify", str(checkpoint), "--input-size", "32"], "randn"),
        "export": (["export", str(checkpoint), "--onnx", str(tmp_path / "m.onnx")], "randn"),
        "inspect": (["inspect", str(checkpoint)], "tensor_shapes"),
        "models": (["models", "resnet1*"], "list_models"),
    }


@pytest.mark.parametrize("error", [RuntimeError, AttributeError])
@pytest.mark.parametrize("name", ["convert", "verify", "export", "inspect", "models"])
def test_an_internal_error_exits_1_with_one_line(checkpoint, tmp_path, monkeypatch, name, error) -> None:
    args, target = _commands(checkpoint, tmp_path)[name]
    if target == "randn":
        monkeypatch.setattr(torch, "randn", _boom(error))
    else:
        module = {"inspect": "convert.cli.inspect", "models": "convert.cli.listing"}[name]
        monkeypatch.setattr(f"{module}.{target}", _boom(error))
    result = runner.invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: internal error"), result.stderr
    assert error.__name__ in lines[0] and "--debug" in lines[0] and "bug in dynconv" in lines[0]
    assert not list(tmp_path.iterdir()), "an internal error left a file behind"
    debug = runner.invoke(app, [*args, "--debug"])
    assert debug.exit_code == 1 and isinstance(debug.exception, error)


def test_debug_prints_the_traceback_from_the_installed_entry_point(checkpoint) -> None:
    """A real process: the patched function raises and ``--debug`` shows the traceback (one line without it: above)."""
    script = (
        "import sys, torch\n"
        "def boom(*a, **k): raise RuntimeError('boom from a patched function')\n"
        "torch.randn = boom\n"
        "from convert.cli import main\n"
        "sys.argv = ['dynconv', *sys.argv[1:]]\n"
        "main()\n"
    )
    cmd = [sys.executable, "-c", script, "verify", str(checkpoint), "--input-size", "32", "--debug"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "RuntimeError: boom from a patched function" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "no_such_model"], "unknown model"),
        (["convert", "resnet18", "--kind", "nope"], "unknown kind"),
        (["inspect", "/no/such/file.safetensors"], "does not exist"),
        (["verify", "/no/such/file.safetensors"], "does not exist"),
        (["models", "zzz_no_match*"], "no model name matches"),
    ],
)
def test_user_errors_still_exit_2(args, message) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


def test_library_messages_name_no_cli_flag_but_the_cli_adds_it(tmp_path) -> None:
    """An API user sees the library's words; the command line adds the switch that helps."""
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(convert.CheckpointError) as caught:
        convert.read_metadata(plain)
    assert "--" not in str(caught.value)
    result = runner.invoke(app, ["inspect", str(plain)])
    assert result.exit_code == 2 and "(--weights FILE)" in result.stderr, result.stderr
