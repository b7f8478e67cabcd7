"""Scopes around core calls: restrict the forms the choice may pick, and record the forms that ran."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from .forms import FORMS, STRATEGIES

_scope = threading.local()


@contextlib.contextmanager
def strategy_scope(*names: str) -> Iterator[None]:
    """Restrict automatic selection to ``names`` inside the block (e.g. for ONNX export).

    ``with strategy_scope("matmul", "unfold", "single"):`` keeps the batch out of conv
    groups for every dynamic layer called in the block. Nested scopes replace the outer one.
    """
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise ValueError(f"unknown strategy {unknown or names!r}; choose from {sorted(STRATEGIES)}")
    previous = getattr(_scope, "allowed", None)
    _scope.allowed = tuple(names)
    try:
        yield
    finally:
        _scope.allowed = previous


def allowed_strategies() -> tuple[str, ...] | None:
    """The strategies the current :func:`strategy_scope` allows, or ``None`` for all."""
    return getattr(_scope, "allowed", None)


@contextlib.contextmanager
def record_strategies() -> Iterator[list[str]]:
    """Collect the form of every core call inside the block (what an export traced)."""
    previous = getattr(_scope, "record", None)
    _scope.record = chosen = []
    try:
        yield chosen
    finally:
        _scope.record = previous


def note_strategy(name: str) -> None:
    """Add form ``name`` (one of the table's) to the active :func:`record_strategies` list, if any."""
    if name not in FORMS:
        raise ValueError(f"{name!r} is not a registered form; register it in dynconv.core.forms first")
    record = getattr(_scope, "record", None)
    if record is not None:
        record.append(name)
