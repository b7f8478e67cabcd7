"""How convert words what went wrong: one-line messages, and refusing an output path up front.

Every command and API that writes a file checks its output before doing any work, so a
bad path fails in a second rather than after minutes, and never leaves debris.
"""

from __future__ import annotations

import os
from pathlib import Path


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_output_path(path: Path, overwrite: bool, *, force: str = "overwrite=True", option: str | None = None) -> None:
    """Refuse an output that exists (unless ``overwrite``), is a folder, or whose folder is missing or read-only.

    ``force`` and ``option`` name the switches the message suggests (``--force``,
    ``--output`` on the command line); errors are ``OSError`` subclasses.
    """
    if path.exists() and not overwrite:
        another = f" or {option} to choose another" if option else ""
        raise FileExistsError(f"output {path} already exists; pass {force} to overwrite it{another}")
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder; give a file name" + (f" with {option}" if option else ""))
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"output folder {folder} does not exist; create it or choose another {option or 'output'}"
        )
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"output folder {folder} is not writable; choose another {option or 'output'}")
