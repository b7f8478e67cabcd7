"""Writing an output so that nothing half-written ever sits under its name: stage it beside, sync, rename.

Checkpoints, the fine-tuning state and ONNX exports (a graph and its external data) all
go through :func:`staged_output`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_output(path: str | Path) -> Iterator[Path]:
    """Yield where to write ``path`` inside a temporary folder beside it; when the block succeeds, every file
    written in that folder is synced and renamed into ``path``'s folder (``path`` itself last); when it fails,
    none is. Each file gets the mode ``open()`` gives a new file."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as folder:
        target = Path(folder) / path.name
        yield target
        for item in sorted(Path(folder).iterdir(), key=lambda p: p == target):  # e.g. external data first
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(item, _default_file_mode())  # some writers (safetensors) make it owner-only
            os.replace(item, path.parent / item.name)


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
