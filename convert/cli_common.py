"""What every ``dynconv`` command shares: consoles, one-sentence errors, exit codes, progress.

Exit codes: 0 success, 1 the work failed, 2 bad input. A user error is one sentence on
stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .checkpoint import CheckpointError
from .converter import SelectionError
from .errors import check_output_path, first_line
from .export import ExportDependencyError, ExportError
from .graph import ProbeError
from .models import ModelNotFoundError
from .recipe import RecipeError
from .verify import Comparison
from .weights import WeightsError

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

#: Errors a user can cause: reported as one sentence, exit code 2.
USER_ERRORS = (
    ModelNotFoundError,
    RecipeError,
    WeightsError,
    CheckpointError,
    SelectionError,
    ProbeError,
    ExportDependencyError,
    ValueError,
    FileNotFoundError,
)

#: Failures of the work itself, reported as one sentence, exit code 1.
WORK_FAILURES = (ExportError,)


class UsageError(Exception):
    """A bad option combination or path, found before any work is done."""


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def fail_tolerance(check: Comparison, what: str, consequence: str) -> NoReturn:
    """Exit 1: a comparison with the original fell outside the contract's tolerance."""
    fail(
        f"{what} differs from the original model by {check.max_rel:.2e} (relative), beyond the 1e-4 tolerance; "
        f"{consequence}",
        code=1,
    )


def guarded(debug: bool, action: Callable[[], T]) -> T:
    """Run ``action``; turn user errors into one line and exit code 2 (tracebacks with --debug)."""
    try:
        return action()
    except WORK_FAILURES as exc:  # the inputs were fine; the work fell short (exit 1, nothing written)
        if debug:
            raise
        fail(first_line(exc), code=1)
    except (UsageError, *USER_ERRORS, RuntimeError) as exc:  # RuntimeError: e.g. offline --pretrained
        if debug:
            raise
        fail(first_line(exc))
    except Exception as exc:  # anything else is our failure, not the user's: exit 1, still no traceback
        if debug:
            raise
        fail(f"{type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)", code=1)


def check_output(path: Path, force: bool, option: str) -> None:
    """:func:`~convert.errors.check_output_path` for a command: a refusal is a usage error (exit 2)."""
    try:
        check_output_path(path, force, force="--force", option=option)
    except OSError as exc:
        raise UsageError(str(exc)) from None


def steps(enabled: bool) -> Progress:
    """A transient spinner on stderr for the named steps of a command."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not enabled,
    )
