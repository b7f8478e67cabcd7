"""What the CLI shows: rich tables for people, plain dicts for ``--json``.

Big models are collapsed: above ``COLLAPSE_AT`` converted layers, rows are grouped by
the first two parts of their names (``layer3.1``, ``features.7``), and skipped convs
are grouped by reason.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from .converter import ConversionResult, LayerRecord
from .verify import Comparison

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
    """The converted-layers table, the skipped-layers table, and the totals."""
    collapsed = len(result.layers) > COLLAPSE_AT
    kinds = {r.kind for r in result.layers}
    uniform = len(kinds) == 1
    title = f"Converted layers ({len(result.layers)}{', grouped' if collapsed else ''}"
    title += f", {next(iter(kinds))})" if uniform else ")"
    table = Table(title=title, title_justify="left")
    table.add_column("layer", overflow="fold", min_width=12)
    table.add_column("kernel")
    table.add_column("channels")
    if not uniform:
        table.add_column("kind")
    table.add_column("experts", justify="right")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    for row in layer_rows(result.layers):
        macs = human(row.macs_after)
        if row.macs_before and row.macs_after is not None:
            macs += f" (+{100 * (row.macs_after / row.macs_before - 1):.1f}%)"
        cells = [row.name, row.kernel, row.channels] + ([] if uniform else [row.kind])
        table.add_row(*cells, row.experts, human(row.params), macs)
    console.print(table)
    if result.skipped:
        skipped = Table(title=f"Skipped convs ({len(result.skipped)})", title_justify="left")
        skipped.add_column("reason")
        skipped.add_column("count", justify="right")
        skipped.add_column("convs")
        by_reason: OrderedDict[str, list[str]] = OrderedDict()
        for record in result.skipped:
            by_reason.setdefault(record.reason, []).append(record.name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f", … ({len(names) - 4} more)" if len(names) > 4 else "")
            skipped.add_row(reason, str(len(names)), shown)
        console.print(skipped)
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
        "totals": result.totals,
        "verification": None if check is None else {**check.__dict__, "ok": check.ok},
        "output": None if dry_run else output,
        "file_size": size,
        "dry_run": dry_run,
    }


def checkpoint_layers(meta: dict[str, Any], shapes: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Per converted layer of a checkpoint: names, kind, options, kernel shape and parameters."""
    rows = []
    for record in meta["layers"]:
        prefix = record["names"][0] + "."
        weight = shapes.get(prefix + "weight", [])
        params = sum(_numel(s) for name, s in shapes.items() if name.startswith(prefix))
        rows.append(
            {
                "name": record["names"][0],
                "aliases": record["names"][1:],
                "kind": record["kind"],
                "options": record["options"],
                "weight_shape": weight,
                "params": params,
            }
        )
    return rows


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def render_checkpoint(
    console: Console, path: str, meta: dict[str, Any], shapes: dict[str, list[int]], size: int
) -> None:
    base = meta["base"]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in base.get("kwargs", {}).items())
    info = Table(show_header=False, title=f"{path}", title_justify="left")
    info.add_column("what")
    info.add_column("value")
    info.add_row("base model", f"{base['source']}:{base['name']}" + (f"({kwargs})" if kwargs else ""))
    info.add_row("format", str(meta["format_version"]))
    info.add_row("file size", file_size(size))
    info.add_row("tensors", f"{len(shapes)} ({human(sum(_numel(s) for s in shapes.values()))} values)")
    info.add_row("converted layers", str(len(meta["layers"])))
    info.add_row("written with", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()))
    info.add_row("digest", f"{meta['digest']['algorithm']} {meta['digest']['value'][:16]}…")
    console.print(info)
    layers = Table(title="Converted layers", title_justify="left")
    for column in ("layer", "kind", "experts", "weight", "params", "options"):
        layers.add_column(column)
    rows = checkpoint_layers(meta, shapes)
    for row in rows[: COLLAPSE_AT if len(rows) > COLLAPSE_AT else len(rows)]:
        options = {k: v for k, v in row["options"].items() if k != "experts"}
        layers.add_row(
            row["name"],
            row["kind"],
            str(row["options"]["experts"]),
            "x".join(map(str, row["weight_shape"])),
            human(row["params"]),
            ", ".join(f"{k}={v}" for k, v in options.items()),
        )
    if len(rows) > COLLAPSE_AT:
        layers.add_row(f"… {len(rows) - COLLAPSE_AT} more (--json lists all)", "", "", "", "", "")
    console.print(layers)
