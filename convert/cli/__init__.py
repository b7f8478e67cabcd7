"""The ``dynconv`` command line: one module per command, the shared boundary in ``common``.

Exit codes: 0 success, 1 the work failed (or an internal error), 2 bad input. Every
error is one line on stderr (a traceback only with ``--debug``), and no command leaves
a partial output file.
"""

from __future__ import annotations

import sys

from . import analyze, collapse, convert, export, finetune, inspect, listing, verify  # noqa: F401 - each registers its command
from .common import app, err


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted", style="red")
        sys.exit(130)


__all__ = ["app", "main"]
