"""ONNX export with a dynamic batch axis, checked with ONNX Runtime before it is written.

The usual dynamic-conv trick folds the batch into a conv's ``groups``, a static ONNX
attribute, so the exported graph only runs at the traced batch size. Export runs
inside ``strategy_scope(*EXPORTABLE_STRATEGIES)``: batched matmul for 1x1 kernels,
im2col + batched matmul or output mixing for the rest, none of which bakes in the
batch. The file is written to a temporary folder beside the output, run in ONNX
Runtime at every checked batch size against the PyTorch model, and moved into place
only if every check is within the contract's tolerance.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import dynconv

from .errors import UserError, WorkFailedError, check_output_path, first_line
from .folding import FoldResult, fold_batchnorm
from .verify import REL_TOL_TEXT, difference, output

#: Batch sizes an export is checked at unless told otherwise (1 and more than the traced 2).
CHECK_BATCHES = (1, 3)


class ExportError(WorkFailedError):
    """The export or its ONNX Runtime check failed; nothing was written."""


class ExportDependencyError(UserError, ImportError):
    """onnx, onnxscript or onnxruntime is missing."""


@dataclass(frozen=True)
class BatchCheck:
    """ONNX Runtime against PyTorch at one batch size."""

    batch: int
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class ExportResult:
    """What was written and how well it matched."""

    path: Path
    input_shape: tuple[int, int, int]
    opset: int
    checks: list[BatchCheck] = field(default_factory=list)
    folded: FoldResult | None = None
    seconds: float = 0.0


def _onnxruntime():  # the module; imported late because export is an optional extra
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError as exc:
        raise ExportDependencyError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing); "
            "install them with pip install 'dynconv[export]'"
        ) from None
    return onnxruntime


def _trace(model: nn.Module, example: torch.Tensor, opset: int | None) -> torch.onnx.ONNXProgram:
    batch = torch.export.Dim("batch")
    with dynconv.strategy_scope(*dynconv.EXPORTABLE_STRATEGIES), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                input_names=["input"],
                output_names=["output"],
                opset_version=opset,
                verbose=False,
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx could not export {type(model).__name__}: {first_line(exc)}") from None


def _check(
    session: object, reference: nn.Module, input_shape: tuple[int, ...], batches: Sequence[int]
) -> list[BatchCheck]:
    checks = []
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        x = torch.randn(batch, *input_shape, generator=gen)
        expected = output(reference, x)
        try:
            actual = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])  # type: ignore[attr-defined]
        except Exception as exc:  # e.g. a batch size baked into the graph
            raise ExportError(
                f"the exported graph does not run in ONNX Runtime at batch {batch}: {first_line(exc)}"
            ) from None
        if tuple(actual.shape) != tuple(expected.shape):
            raise ExportError(
                f"ONNX Runtime returned shape {tuple(actual.shape)} at batch {batch}, PyTorch {tuple(expected.shape)}"
            )
        checks.append(BatchCheck(batch, *difference(expected, actual)))
    return checks


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: tuple[int, int, int] | None = None,
    fold_bn: bool = False,
    check_batches: Sequence[int] = CHECK_BATCHES,
    overwrite: bool = False,
    opset: int | None = None,
) -> ExportResult:
    """Export ``model`` (eval mode) to ONNX with a dynamic batch axis; check it; write it atomically.

    ``input_shape`` is ``(C, H, W)`` (default: what the model expects). With ``fold_bn``
    every BatchNorm that directly follows a conv is folded into it first; the check
    still compares against ``model`` unfolded, so it covers the fold too. Raises
    :class:`ExportError` (and writes nothing) if ONNX Runtime differs beyond tolerance.
    """
    from .probe import default_input_size

    start = time.perf_counter()
    path = Path(path)
    check_output_path(path, overwrite)
    if not check_batches or min(check_batches) < 1:
        raise UserError(f"check batch sizes must be positive, got {list(check_batches)}")
    ort = _onnxruntime()
    input_shape = tuple(input_shape or default_input_size(model))  # type: ignore[assignment]
    folded = fold_batchnorm(model) if fold_bn else None
    target = folded.model if folded else model
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(1))
    was_training = target.training
    try:  # export the eval-mode model in place: no copy of a possibly large model
        program = _trace(target.eval(), example, opset)
    finally:
        target.train(was_training)
    program.model.metadata_props["dynconv.version"] = dynconv.__version__
    program.model.metadata_props["dynconv.dynamic_layers"] = str(len(dynconv.dynamic_layers(target)))
    program.model.metadata_props["dynconv.folded_batchnorms"] = str(len(folded.folded) if folded else 0)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as staging:
        staged = Path(staging) / path.name
        program.save(staged)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
        checks = _check(session, model, input_shape, check_batches)
        del session
        bad = [c for c in checks if not c.ok]
        if bad:
            raise ExportError(
                f"ONNX Runtime differs from PyTorch by {bad[0].max_rel:.2e} (relative) at batch {bad[0].batch}, "
                f"beyond the {REL_TOL_TEXT} tolerance; {path} was not written"
            )
        for item in sorted(Path(staging).iterdir(), key=lambda p: p == staged):  # external data first, graph last
            os.replace(item, path.parent / item.name)
    opset_used = next((v for d, v in program.model.opset_imports.items() if d == ""), opset or 0)
    return ExportResult(path, input_shape, int(opset_used), checks, folded, time.perf_counter() - start)
