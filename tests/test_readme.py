"""The README as a new user meets it: its set-up command runs twice, it lists every command, and its
transfer-learning workflow runs as written, from a fresh folder, through the installed ``dynconv``.

The workflow blocks are read from the README (``<!-- test:workflow-python -->`` and
``<!-- test:workflow-shell -->``), so what the README shows is what this runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import convert
from convert.cli import app
from convert.cli import finetune as finetune_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits import write_digits  # noqa: E402


def block(tag: str) -> str:
    """The fenced block that follows ``<!-- tag -->`` in the README."""
    found = re.search(rf"<!-- {re.escape(tag)} -->\n```[a-z]*\n(.*?)```", README, re.S)
    assert found, f"README.md has no {tag} block"
    return found.group(1)


def dynconv_exe() -> str:
    exe = shutil.which("dynconv") or str(Path(sys.executable).parent / "dynconv")
    assert Path(exe).exists(), "the dynconv console script is not installed"
    return exe


def env(**extra: str) -> dict[str, str]:
    """This test's environment (so the script runs this checkout), at 80 columns, without a terminal."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "80", "OMP_NUM_THREADS": "2", **extra}


@dataclass
class Ran:
    """What one README command did."""

    code: int
    stdout: str
    stderr: str


def shell(line: str, cwd: Path, **extra: str) -> Ran:
    """One README command line through the installed ``dynconv`` script, at 80 columns."""
    args = shlex.split(line)
    assert args[0] == "dynconv", line
    done = subprocess.run(
        [dynconv_exe(), *args[1:]], cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=300
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def in_process(line: str, cwd: Path) -> Ran:
    """One README command line run by the same app in this process (both streams captured apart)."""
    args = shlex.split(line)
    assert args[0] == "dynconv", line
    old = os.getcwd()
    os.chdir(cwd)
    try:
        done = CliRunner().invoke(app, args[1:])
    finally:
        os.chdir(old)
    return Ran(done.exit_code, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> dict[str, object]:
    """The README's workflow, run from a fresh folder with a 10-class image folder as ``data/``.

    The Python block runs here; the first shell command (convert) through the installed
    script at 80 columns, as a terminal runs it; the others in this process (the same app),
    which keeps this test quick.
    """
    folder = tmp_path_factory.mktemp("fresh")
    write_digits(folder / "data", size=32, limit=60)  # 10 classes, 6 images each: a small folder
    printed = io.StringIO()
    old = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(block("test:workflow-python"), "README.md", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(old)
    runs = {}
    for index, line in enumerate(block("test:workflow-shell").strip().splitlines()):
        done = shell(line, folder) if index == 0 else in_process(line, folder)
        assert done.code == 0, (line, done.stderr[-3000:])
        runs[line.split()[1]] = done
    return {"folder": folder, "printed": printed.getvalue(), "runs": runs}


def test_the_readme_workflow_runs_and_rebuilds_by_name(workflow) -> None:
    folder = workflow["folder"]
    assert "{'source': 'torchvision', 'name': 'resnet18', 'kwargs': {}} with a new head" in workflow["printed"]
    for name in ("resnet18-10.safetensors", "mobilenetv3-10.safetensors", "r18-10-ft.safetensors"):
        model = convert.load_checkpoint(folder / name)  # by name: no model=
        assert convert.read_metadata(folder / name)["head"]["num_classes"] == 10
        assert model.get_submodule(convert.read_metadata(folder / name)["head"]["layers"][0]).weight.shape[0] == 10
    assert convert.read_metadata(folder / "mobilenetv3-10.safetensors")["base"]["source"] == "timm"
    assert (folder / "r18-10.onnx").stat().st_size > 0


def test_convert_at_80_columns_keeps_every_layer_name_whole(workflow) -> None:
    shown = workflow["runs"]["convert"].stdout
    lines = shown.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    for name in ("layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2"):
        assert any(re.search(rf"[│ ]{re.escape(name)} ", line) for line in lines), name
    assert "new head" in shown and "10 classes" in shown


def test_finetune_prints_each_epoch_once_when_both_streams_are_captured(workflow) -> None:
    done = workflow["runs"]["finetune"]
    assert len(re.findall(r"epoch 1/1: train loss", done.stdout + done.stderr)) == 1
    assert "wrote r18-10-ft.safetensors (epoch 1)" in done.stdout


def test_finetune_on_a_terminal_shows_a_progress_bar_with_steps_and_eta(workflow, monkeypatch) -> None:
    """stderr as a terminal would be (a real rich console, forced interactive, into a buffer)."""
    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, force_interactive=True, width=80, no_color=True)
    monkeypatch.setattr(finetune_cli, "err", console)
    line = "dynconv finetune r18-10.safetensors data/ --epochs 1 --batch-size 16 --max-steps 1 -o tty.safetensors"
    done = in_process(line, workflow["folder"])
    assert done.code == 0, done.stderr[-3000:]
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())  # cursor moves between the frames
    assert re.search(r"epoch 1/1 .*[01]/1 steps, eta", shown), shown[-2000:]
    assert len(re.findall(r"epoch 1/1: train loss", done.stdout + shown)) == 1


def test_the_setup_command_can_run_again(tmp_path) -> None:
    """The ci:install block's dynconv command, run where its first run left its checkpoint."""
    commands = [part.strip() for part in block("ci:install").split("&&") if part.strip().startswith("dynconv ")]
    assert len(commands) == 1
    (tmp_path / "resnet18-condconv-4e.safetensors").write_bytes(b"from the first run")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        again = CliRunner().invoke(app, shlex.split(commands[0])[1:])
    finally:
        os.chdir(old)
    assert again.exit_code == 0, again.stderr
    assert convert.read_metadata(tmp_path / "resnet18-condconv-4e.safetensors")["base"]["name"] == "resnet18"


def test_the_readme_lists_every_command_and_names_the_export_extra() -> None:
    synopsis = README.split("### The command line", 1)[1].split("```", 2)[1]
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"convert", "kinds", "version", "finetune", "export"} <= set(names)
    for name in names:
        assert re.search(rf"^dynconv {name}\b", synopsis, re.M), f"the README's command line lacks `dynconv {name}`"
    assert 'pip install -c constraints.txt -e ".[export]"      # the export extra' in README
