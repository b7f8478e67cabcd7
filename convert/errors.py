"""How convert words what went wrong: one error hierarchy, one-line messages, output checks.

Every exception convert raises on purpose is a :class:`DynconvError`: a
:class:`UserError` when the input was at fault (the CLI exits 2), a :class:`WorkFailedError`
when the input was fine but the work fell short (exit 1). Anything else reaching the
CLI is a bug (exit 1, and it says so). Messages are sentences about the library's
terms; ``cli_hint`` names the command-line switch, which only the CLI shows.
"""

from __future__ import annotations

import os
from pathlib import Path


class DynconvError(Exception):
    """Base of every error convert raises on purpose."""

    def __init__(self, message: str, *, cli_hint: str | None = None) -> None:
        super().__init__(message)
        self.cli_hint = cli_hint


class UserError(DynconvError, ValueError):
    """The input was at fault (model name, recipe, file, option): exit code 2."""


class WorkFailedError(DynconvError):
    """The input was fine but the work fell short (e.g. a check out of tolerance): exit code 1."""


class OutputPathError(UserError, OSError):
    """An output path that cannot be written: exists, is a folder, or its folder is missing or read-only."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_output_path(path: Path, overwrite: bool, *, force: str = "overwrite=True", option: str | None = None) -> None:
    """Refuse an output that exists (unless ``overwrite``), is a folder, or whose folder is missing or read-only.

    ``force`` and ``option`` name the switches the message suggests (``--force``,
    ``--output`` on the command line); the error is an :class:`OutputPathError`.
    """
    if path.exists() and not overwrite:
        another = f" or {option} to choose another" if option else ""
        raise OutputPathError(f"output {path} already exists; pass {force} to overwrite it{another}")
    if path.is_dir():
        raise OutputPathError(f"output {path} is a folder; give a file name" + (f" with {option}" if option else ""))
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(
            f"output folder {folder} does not exist; create it or choose another {option or 'output'}"
        )
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"output folder {folder} is not writable; choose another {option or 'output'}")
