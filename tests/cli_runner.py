"""Run the dynconv CLI in process (typer's CliRunner), optionally from another working directory."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner, Result

from convert.cli import app

runner = CliRunner()


def run(*args: object, cwd: Path | None = None) -> Result:
    """``dynconv ARGS...`` with every argument as a string; stdout and stderr kept apart."""
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
