"""What the CLI shows about files: a checkpoint (``inspect``), its verification, an ONNX export.

Tables for people, plain dicts for ``--json``; the conversion itself is shown by
:mod:`convert.cli.render`, whose number formats these share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..export import ExportResult
from ..verify import Comparison
from .fit import Col, fitted_table
from .render import COLLAPSE_AT, file_size, human


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
    if meta.get("collapsed"):
        info.add_row("collapsed layers", f"{len(meta['collapsed'])} static again: {', '.join(meta['collapsed'])}")
    if meta.get("head"):
        info.add_row("new head", f"{meta['head']['num_classes']} classes ({', '.join(meta['head']['layers'])})")
    if meta.get("sharing"):
        shared = sum(len(g["layers"]) for g in meta["sharing"])
        info.add_row("shared routing", f"{len(meta['sharing'])} blocks, one router each ({shared} layers)")
    if meta.get("preprocessing"):
        prep = meta["preprocessing"]
        info.add_row(
            "preprocessing",
            f"{'x'.join(map(str, prep['input_size'][1:]))}, mean {prep['mean']} std {prep['std']}, "
            f"{prep['interpolation']}, crop {prep['crop_pct']:g} (from {prep['source']})",
        )
    for what, text in training_rows(path, meta, shapes):
        info.add_row(what, text)
    info.add_row("written with", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()))
    info.add_row("digest", f"{meta['digest']['algorithm']} {meta['digest']['value'][:16]}…")
    console.print(info)
    records = checkpoint_layers(meta, shapes)
    rows = []
    for row in records[:COLLAPSE_AT]:
        options = {k: v for k, v in row["options"].items() if k != "experts"}
        rows.append(
            [
                row["name"],
                row["kind"],
                str(row["options"]["experts"]),
                "x".join(map(str, row["weight_shape"])),
                human(row["params"]),
                ", ".join(f"{k}={v}" for k, v in options.items()),
            ]
        )
    columns = [Col("layer", whole=True), Col("kind"), Col("experts", "right"), Col("weight"), Col("params", "right")]
    columns.append(Col("options"))
    drop = ("options", "weight", "params")
    console.print(fitted_table(console, columns, rows, drop=drop, title="Converted layers", title_justify="left"))
    if len(records) > COLLAPSE_AT:
        console.print(f"… {len(records) - COLLAPSE_AT} more (--json lists all)", highlight=False, markup=False)


def checkpoint_json(path: str, meta: dict[str, Any], shapes: dict[str, list[int]], size: int) -> dict[str, Any]:
    """``dynconv inspect --json``: the metadata, the file's size and tensor count, the layers, the training state."""
    layers = checkpoint_layers(meta, shapes)
    found = {"path": path, "file_size": size, "tensors": len(shapes), "layers": layers}
    if meta.get("training"):
        found["training_state"] = _training_state(path, meta, shapes)
    return {**meta, **found}


def _training_state(path: str, meta: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Where a fine-tuned checkpoint's resumable state is: its sidecar (and its position), or inside the file."""
    from ..checkpoint import TRAINING_PREFIX
    from ..finetune.state import read_sidecar_info, sidecar_path

    if any(name.startswith(TRAINING_PREFIX) for name in shapes):
        return {"where": "inside the file (older dynconv)"}
    sidecar = sidecar_path(Path(path))
    try:
        info = read_sidecar_info(sidecar)
    except Exception:
        return {"where": str(sidecar), "status": "damaged"}
    if info is None:
        return {"where": str(sidecar), "status": "missing"}
    same = info.get("run") == meta["training"].get("run")
    return {
        "where": str(sidecar),
        "status": "resumable" if same else "another run",
        "epoch": info["epoch"],
        "step": info["step"],
    }


def training_rows(path: str, meta: dict[str, Any], shapes: dict[str, list[int]]) -> list[tuple[str, str]]:
    """``inspect`` rows for a fine-tuned checkpoint: its training record and where its training state is."""
    training = meta.get("training")
    if not training:
        return []
    history = training.get("history") or []
    last = history[-1] if history else {}
    epochs = training.get("epochs")
    record = f"epoch {training.get('epoch', len(history))}" + (f" of {epochs}" if epochs else "")
    if last:
        record += f", val acc {last['val_acc']:.3f}"
    if training.get("weights"):
        record += f", {'EMA' if training['weights'] == 'ema' else 'raw'} weights"
    if training.get("source"):
        record += f", from {training['source']}"
    state = _training_state(path, meta, shapes)
    where = state["where"]
    if "status" in state:
        where += f" ({state['status']}" + (
            f", at epoch {state['epoch']} step {state['step']})" if "epoch" in state else ")"
        )
    return [("fine-tuned", record), ("training state", where)]


def verification_json(checkpoint: Path, y: torch.Tensor, check: Comparison | None) -> dict[str, Any]:
    """``dynconv verify --json``: digest, load, forward and (optionally) the comparison."""
    return {
        "checkpoint": str(checkpoint),
        "digest": "ok",
        "loads": True,
        "output_shape": list(y.shape),
        "finite": bool(torch.isfinite(y).all()),
        "comparison": None if check is None else {**check.__dict__, "ok": check.ok},
    }


def render_verification(
    console: Console,
    checkpoint: Path,
    meta: dict[str, Any],
    size: tuple[int, int],
    y: torch.Tensor,
    check: Comparison | None,
) -> None:
    """``dynconv verify``: one row per check."""
    table = Table(show_header=False, title=f"verify {checkpoint}", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_row("digest", "ok")
    table.add_row(
        "rebuilt and loaded",
        f"{meta['base']['source']}:{meta['base']['name']}, {len(meta['layers'])} dynamic layers"
        + (f", {len(meta['collapsed'])} collapsed into static convs" if meta.get("collapsed") else ""),
    )
    verdict = "finite" if bool(torch.isfinite(y).all()) else "NOT FINITE"
    table.add_row(f"forward at {size[0]}x{size[1]}", f"output {tuple(y.shape)}, {verdict}")
    if check is not None:
        given = " (the original given this checkpoint's new head)" if meta.get("head") else ""
        verdict = "ok" if check.within_tolerance else "OUT OF TOLERANCE"
        table.add_row(
            "vs original weights",
            f"max difference {check.max_rel:.2e} relative — {verdict}{given}",
        )
    console.print(table)


def export_json(result: ExportResult) -> dict[str, Any]:
    """``dynconv export --json``: the file, its input, the checks and the folding."""
    folded = result.folded
    return {
        "path": str(result.path),
        "file_size": result.path.stat().st_size,
        "input_shape": ["batch" if result.batch is None else result.batch, *result.input_shape],
        "batch": "dynamic" if result.batch is None else result.batch,
        "strategies": result.strategies,
        "opset": result.opset,
        "checks": [c.__dict__ for c in result.checks],
        "folded_batchnorm": None if folded is None else [p.__dict__ for p in folded.folded],
        "unfolded_batchnorm": None if folded is None else [s.__dict__ for s in folded.skipped],
        "seconds": round(result.seconds, 1),
    }


def render_export(console: Console, result: ExportResult) -> None:
    """``dynconv export``: the file, its input, the folding and each ONNX Runtime check."""
    table = Table(show_header=False, title=f"export {result.path}", title_justify="left")
    table.add_column("item")
    table.add_column("value")
    batch = "batch" if result.batch is None else str(result.batch)
    table.add_row("input", escape(f"[{batch}, {', '.join(map(str, result.input_shape))}] float32"))
    forms = ", ".join(f"{name} {count}" for name, count in sorted(result.strategies.items()))
    table.add_row(
        "dynamic layers as", f"{forms or 'none'} ({'any batch' if result.batch is None else 'this batch only'})"
    )
    table.add_row("file", f"{result.path.stat().st_size / 2**20:.1f} MiB, opset {result.opset}")
    if result.folded is not None:
        kept = f", {len(result.folded.skipped)} left in place" if result.folded.skipped else ""
        table.add_row("BatchNorm folded", f"{len(result.folded.folded)}{kept}")
    for check in result.checks:
        verdict = "ok" if check.ok else "OUT OF TOLERANCE"
        table.add_row(
            f"onnxruntime, batch {check.batch}",
            f"max difference {check.max_abs:.2e} ({check.max_rel:.2e} relative) — {verdict}",
        )
    console.print(table)
