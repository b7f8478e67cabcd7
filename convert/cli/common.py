"""What every ``dynconv`` command shares: the app, consoles, the error boundary, progress.

Exit codes: 0 success, 1 the work failed (or dynconv has a bug), 2 bad input. Each
command runs inside one boundary (:func:`command`): a :class:`~convert.errors.UserError`
is one sentence and exit 2, a :class:`~convert.errors.WorkFailedError` one sentence and
exit 1, anything else an internal error, one line and exit 1. ``--debug`` re-raises,
so the traceback shows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import click
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import nn

from ..errors import DynconvError, OutputPathError, UserError, WorkFailedError, check_output_path, first_line
from ..models import build_model
from ..verify import REL_TOL_TEXT, Comparison

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn the convs of a trained model into dynamic convolutions that start out computing the same function.",
)

#: The ``--debug`` and ``--json`` options, the same on every command.
Debug = Annotated[bool, typer.Option("--debug", help="show the traceback of an error")]
Json = Annotated[bool, typer.Option("--json", help="print a machine-readable result")]
#: ``--model``, the same on every command that loads a checkpoint (see :func:`base_model`).
BaseModelName = Annotated[
    str | None,
    typer.Option("--model", help="base model of a checkpoint converted from custom code: package.module:factory"),
]


class UsageError(UserError):
    """A bad option combination or path, found before any work is done."""


class ToleranceError(WorkFailedError):
    """A comparison with the original model fell outside the contract's tolerance."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    err.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def explain(exc: BaseException) -> str:
    """One line for an error: its first line, with the command-line switch it suggests."""
    hint = getattr(exc, "cli_hint", None)
    return first_line(exc) + (f" ({hint})" if hint else "")


def command(name: str) -> Callable[[F], F]:
    """Register a command with the app, inside the error boundary (see the module docstring)."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
                raise
            except Exception as exc:
                if kwargs.get("debug"):
                    raise
                if isinstance(exc, UserError):
                    fail(explain(exc), code=2)
                if isinstance(exc, DynconvError):
                    fail(explain(exc), code=1)
                fail(
                    f"internal error ({type(exc).__name__}: {first_line(exc)}); this is a bug in dynconv, "
                    "rerun with --debug for the traceback",
                    code=1,
                )

        app.command(name)(run)
        return fn

    return register


def base_model(name: str | None) -> nn.Module | None:
    """The base module ``--model`` names, for :func:`convert.load_checkpoint`; ``None``: the checkpoint names it."""
    return build_model(name) if name else None


def tolerance_error(check: Comparison, what: str, consequence: str) -> ToleranceError:
    """The error for a comparison that fell outside the tolerance (exit 1)."""
    return ToleranceError(
        f"{what} differs from the original model by {check.max_rel:.2e} (relative), beyond the {REL_TOL_TEXT} "
        f"tolerance; {consequence}"
    )


def check_output(path: Path, force: bool, option: str, *, alternative: str = "") -> None:
    """:func:`~convert.errors.check_output_path` with the command's switches in the message."""
    try:
        check_output_path(path, force, force="--force", option=option)
    except OutputPathError as exc:
        raise UsageError(str(exc) + alternative) from None


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


def step(progress: Progress, text: str, action: Callable[[], Any]) -> Any:
    """Run ``action`` under a spinner line ``text``."""
    task = progress.add_task(text)
    try:
        return action()
    finally:
        progress.remove_task(task)
