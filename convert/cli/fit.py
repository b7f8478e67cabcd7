"""Tables that fit the terminal without breaking names: an 80-column terminal is the common case.

rich shrinks every column of a table that is too wide, and folds text mid-word, so a
layer name becomes ``layer2.0.downsampl`` / ``e.0``. Here the widths are chosen
first: columns holding names keep each cell on one line; the others wrap at spaces
(never inside a word); and when even that does not fit, the least needed columns are
dropped, in the order the caller gives.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text


@dataclass(frozen=True)
class Col:
    """One column: its header, alignment, and whether its cells must stay whole (names)."""

    header: str
    justify: str = "left"
    whole: bool = False


def _overhead(columns: int) -> int:
    """Borders and padding of a rich table with the default box: one space each side, n + 1 rules."""
    return 3 * columns + 1


def _natural(col: Col, cells: list[str]) -> int:
    return max(cell_len(line) for text in [col.header, *cells] for line in (text.splitlines() or [""]))


def _narrowest(col: Col, cells: list[str]) -> int:
    """The narrowest this column can be: whole cells, or the longest word."""
    if col.whole:
        return _natural(col, cells)
    return max((cell_len(word) for text in [col.header, *cells] for word in text.split()), default=1)


def natural_width(columns: Sequence[Col], rows: Sequence[Sequence[str]]) -> int:
    """How wide a table of ``rows`` is with nothing wrapped."""
    widths = [_natural(col, [str(row[i]) for row in rows]) for i, col in enumerate(columns)]
    return sum(widths) + _overhead(len(columns))


def fitted_table(
    console: Console,
    columns: Sequence[Col],
    rows: Sequence[Sequence[str]],
    *,
    drop: Sequence[str] = (),
    **table_options: Any,
) -> Table:
    """A table of ``rows`` no wider than ``console``: whole columns never wrap or get cut, others wrap at
    spaces; while even that is too wide, the columns named in ``drop`` go, in that order."""
    keep = list(range(len(columns)))
    cells = {i: [str(row[i]) for row in rows] for i in keep}
    room = console.width

    def narrowest(indices: list[int]) -> int:
        return sum(_narrowest(columns[i], cells[i]) for i in indices) + _overhead(len(indices))

    for header in drop:
        if narrowest(keep) <= room:
            break
        keep = [i for i in keep if columns[i].header != header]
    widths = {i: _natural(columns[i], cells[i]) for i in keep}
    floors = {i: _narrowest(columns[i], cells[i]) for i in keep}
    excess = sum(widths.values()) + _overhead(len(keep)) - room
    while excess > 0:
        shrinkable = [i for i in keep if widths[i] > floors[i]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    table = Table(**table_options)
    for i in keep:
        col = columns[i]
        table.add_column(_wrap(col.header, widths[i]), justify=col.justify, no_wrap=True, width=widths[i])  # type: ignore[arg-type]
    for row in range(len(rows)):
        texts = (cells[i][row] if columns[i].whole else _wrap(cells[i][row], widths[i]) for i in keep)
        table.add_row(*(Text(text) for text in texts))  # plain text: a name is never read as markup
    return table


def _wrap(text: str, width: int) -> str:
    """``text`` wrapped at spaces to ``width`` (words longer than that are left whole)."""
    if cell_len(text) <= width:
        return text
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text
