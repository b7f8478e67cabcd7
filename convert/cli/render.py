"""What the CLI shows about a conversion, recipes, kinds and training: rich tables and plain
text for people, plain dicts for ``--json`` (files: :mod:`convert.cli.render_files`).

Big models are collapsed: above ``COLLAPSE_AT`` converted layers, rows are grouped by
the first two parts of their names (``layer3.1``, ``features.7``), and skipped convs
are grouped by reason.
"""

from __future__ import annotations

import re
import textwrap
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from ..converter import ConversionResult, LayerRecord
from ..measured import PAYS
from ..recipe import Recipe
from ..sharing import SharingPlan
from ..verify import Comparison
from .fit import Col, fitted_table, natural_width

if TYPE_CHECKING:
    from dynconv import DynamicConv2d

    from ..finetune import EpochLog

COLLAPSE_AT = 24


def human(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def file_size(n: int) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n} B"


@dataclass
class Row:
    name: str
    kernel: str
    channels: str
    kind: str
    experts: str
    params: int
    macs_before: int | None
    macs_after: int | None


def _join(values: Iterable[str]) -> str:
    return ", ".join(OrderedDict.fromkeys(values))


def layer_rows(records: list[LayerRecord]) -> list[Row]:
    """One row per layer, or per name group when there are many layers."""
    rows = [
        Row(
            r.name,
            f"{r.kernel[0]}x{r.kernel[1]}"
            + (f" /{r.stride[0]}" if max(r.stride) > 1 else "")
            + (" dw" if r.conv_type == "depthwise" else ""),
            f"{r.in_channels}→{r.out_channels}",
            r.kind,
            str(r.experts),
            r.params_after,
            r.macs_before,
            r.macs_after,
        )
        for r in records
    ]
    if len(rows) <= COLLAPSE_AT:
        return rows
    groups: OrderedDict[str, list[Row]] = OrderedDict()
    for row in rows:
        groups.setdefault(".".join(row.name.split(".")[:2]), []).append(row)
    return [
        Row(
            f"{prefix}.* ({len(members)} convs)" if len(members) > 1 else members[0].name,
            _join(m.kernel for m in members),
            f"{members[0].channels.split('→')[0]}→{members[-1].channels.split('→')[1]}",
            _join(m.kind for m in members),
            _join(m.experts for m in members),
            sum(m.params for m in members),
            _sum(m.macs_before for m in members),
            _sum(m.macs_after for m in members),
        )
        for prefix, members in groups.items()
    ]


def _sum(values: Iterable[int | None]) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def render_conversion(
    console: Console,
    result: ConversionResult,
    check: Comparison | None,
    output: str | None,
    size: int | None,
    dry_run: bool,
) -> None:
    """The converted-layers table, the skipped-layers table, the recipe rules, and the totals.

    Layer names stay whole at any width (see :mod:`convert.cli.fit`).
    """
    collapsed = len(result.layers) > COLLAPSE_AT
    kinds = {r.kind for r in result.layers}
    uniform = len(kinds) == 1
    title = f"Converted layers ({len(result.layers)}" + (f", {next(iter(kinds))}" if uniform else "")
    columns = [Col("layer", whole=True), Col("kernel"), Col("channels")] + ([] if uniform else [Col("kind")])
    columns += [Col("experts", "right"), Col("params", "right"), Col("MACs", "right")]
    rows = []
    for row in layer_rows(result.layers):
        macs = human(row.macs_after)
        if row.macs_before and row.macs_after is not None:
            macs += f" (+{100 * (row.macs_after / row.macs_before - 1):.1f}%)"
        cells = [row.name, row.kernel, row.channels] + ([] if uniform else [row.kind])
        rows.append([*cells, row.experts, human(row.params), macs])
    experts = {row[-3] for row in rows}
    if len(experts) == 1 and natural_width(columns, rows) > console.width:  # say it once, in the title
        at = len(columns) - 3
        columns, rows = columns[:at] + columns[at + 1 :], [row[:at] + row[at + 1 :] for row in rows]
        title += f", {next(iter(experts))} experts"
    title += ", one row per block)" if collapsed else ")"  # a block: the first two parts of the names
    drop = ("experts", "kernel", "params", "kind")
    console.print(fitted_table(console, columns, rows, drop=drop, title=title, title_justify="left"))
    if result.skipped:
        render_reasons(console, result.skipped, f"Skipped convs ({len(result.skipped)})")
        if any(record.default for record in result.skipped):
            console.print(
                "To convert a conv the default selection skips (stem, 1x1 input, not run): name it exactly "
                "with --include NAME, or use a recipe rule with skip: false.",
                highlight=False,
                markup=False,
            )
    if result.rules:
        rows = [[str(r.index), r.match, r.action or "—", str(r.convs)] for r in result.rules]
        columns = [Col("rule", "right"), Col("match", whole=True), Col("does"), Col("convs", "right")]
        console.print(fitted_table(console, columns, rows, title="Recipe rules", title_justify="left"))
    if result.sharing is not None:
        render_sharing(console, result.sharing)
    totals = result.totals
    summary = Table(show_header=False, title="Totals", title_justify="left")
    summary.add_column("what")
    summary.add_column("value")
    summary.add_row(
        "params", f"{human(totals['params_before'])} → {human(totals['params_after'])} ({totals['params_ratio']:.2f}×)"
    )
    _, h, w = result.input_shape
    summary.add_row(
        f"MACs at {h}x{w}",
        f"{human(totals['macs_before'])} → {human(totals['macs_after'])} ({100 * totals['macs_increase']:+.1f}%)",
    )
    if result.head is not None:
        layers = ", ".join(result.head["layers"])
        summary.add_row(
            "new head",
            f"{result.head['num_classes']} classes ({layers}); checked against the original given the same head",
        )
    if result.sharing is not None:
        summary.add_row("routers", f"{totals['routers']} for {totals['converted']} layers (shared per block)")
    if check is not None:
        verdict = "ok" if check.within_tolerance else "OUT OF TOLERANCE"
        note = "" if check.input_sensitive else " (the original's output ignores its input: check is vacuous)"
        summary.add_row(
            "max difference", f"{check.max_rel:.2e} relative, {check.max_abs:.2e} absolute — {verdict}{note}"
        )
    console.print(summary)
    if dry_run:
        console.print("dry run: nothing written", highlight=False)
    elif output is not None:
        console.print(f"wrote {output} ({file_size(size or 0)})", soft_wrap=True, highlight=False, markup=False)


def render_reasons(console: Console, records: Sequence[Any], title: str) -> None:
    """Records with a ``reason`` and a ``name`` as one row per reason: count and the first few names."""
    by_reason: OrderedDict[str, list[str]] = OrderedDict()
    for record in records:
        by_reason.setdefault(record.reason, []).append(record.name)
    rows = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f", … ({len(names) - 4} more)" if len(names) > 4 else "")
        rows.append([reason, str(len(names)), shown])
    columns = [Col("reason"), Col("count", "right"), Col("convs")]
    console.print(fitted_table(console, columns, rows, title=title, title_justify="left"))


def render_sharing(console: Console, plan: SharingPlan) -> None:
    """Shared routing: one row per block whose convs share a router, then the convs that do not, by reason."""
    rows = []
    for group in plan.groups[:COLLAPSE_AT]:
        prefix = group.block + "."
        rows.append([group.block, group.block_type, ", ".join(n.removeprefix(prefix) for n in group.layers)])
    if len(plan.groups) > COLLAPSE_AT:
        rows.append([f"… {len(plan.groups) - COLLAPSE_AT} more (--json lists all)", "", ""])
    columns = [Col("block", whole=True), Col("type"), Col("convs sharing its router")]
    title = f"Shared routing ({len(plan.groups)} blocks, one router each)"
    console.print(fitted_table(console, columns, rows, title=title, title_justify="left"))
    if plan.unshared:
        render_reasons(console, plan.unshared, f"Own router kept ({len(plan.unshared)})")


def conversion_json(
    model: str,
    result: ConversionResult,
    check: Comparison | None,
    output: str | None,
    size: int | None,
    dry_run: bool,
) -> dict[str, Any]:
    return {
        "model": model,
        "base": result.base.to_dict(),
        "input_shape": list(result.input_shape),
        "layers": [r.to_dict() for r in result.layers],
        "skipped": [s.to_dict() for s in result.skipped],
        "head": result.head,
        "rules": [r.to_dict() for r in result.rules],
        "warnings": [w.to_dict() for w in result.warnings],
        "totals": result.totals,
        "sharing": None if result.sharing is None else result.sharing.to_dict(),
        "verification": None if check is None else {**check.__dict__, "ok": check.ok},
        "output": None if dry_run else output,
        "file_size": size,
        "dry_run": dry_run,
    }


def epoch_line(log: EpochLog, epochs: int) -> str:
    """One epoch of ``dynconv finetune`` as a log line, printed once, when the epoch ends."""
    temperature = "" if log.temperature is None else f", temperature {log.temperature:.1f}"
    return (
        f"epoch {log.epoch}/{epochs}: train loss {log.train_loss:.4f} acc {log.train_acc:.3f}, "
        f"val loss {log.val_loss:.4f} acc {log.val_acc:.3f}{temperature} ({log.seconds:.1f} s)"
    )


def recipes_table(recipes: Mapping[str, Recipe]) -> Table:
    """``dynconv recipes``: name, model and description of each shipped recipe."""
    table = Table("recipe", "model", "description")
    for name, spec in recipes.items():
        table.add_row(name, spec.model.name if spec.model else "any", spec.description)
    return table


def plain(text: str) -> str:
    """``text`` without docstring markup (double or single backquotes, roles, bold), for a terminal."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"`{1,2}([^`]+)`{1,2}", r"\1", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"\1", text)


def kinds_text(layers: Mapping[str, type[DynamicConv2d]], width: int = 78) -> str:
    """``dynconv kinds``: each kind's paper, formula, routing, cost, speed and options, as plain text
    no line of which is wider than ``width`` (the terminal's)."""
    width = max(width, 40)  # below that the labels leave no room: lines may then run over
    blocks = []
    for name, cls in layers.items():  # "measured": what the kind bought on benchmarks/pays.py
        info = cls.info
        options = ", ".join(f"{o.name}={o.default!r}" for o in cls.option_specs().values()) or "none"
        header = f"{name}  {plain(info.title)}  (dynconv.{cls.__name__})"
        lines = textwrap.wrap(header, width, subsequent_indent=" " * (len(name) + 2), break_on_hyphens=False)
        for label, text in (
            ("kernel", info.formula),
            ("routing", info.routing),
            ("parameters", info.parameters),
            ("speed", info.speed),
            ("options", options),
            ("measured", PAYS.get(name, "not on the Fashion-MNIST benchmark yet (benchmarks/pays.py)")),
        ):
            lines += textwrap.wrap(
                plain(text),
                width,
                initial_indent=f"  {label + ':':<12}",
                subsequent_indent=" " * 14,
                break_on_hyphens=False,
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
