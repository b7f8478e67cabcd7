"""ONNX export for the batch it will run at, checked with ONNX Runtime before it is written.

With ``batch=None`` the batch axis stays dynamic: the core sees a symbolic batch and
picks batch-agnostic forms by itself (batched matmul for 1x1 kernels, output mixing
for depthwise and big kernels on small maps, im2col + batched matmul for the rest).
With a number the graph is for that batch only and uses the fastest form for it:
at batch 1 the kernel is mixed once and run as one ``Conv`` with a computed weight
(a ``MatMul`` for 1x1 kernels), at a larger batch the batch is folded into the conv's groups (the usual dynamic-conv
trick, whose ``groups`` attribute bakes the batch in). Which forms were traced is
recorded in the ONNX metadata (``dynconv.strategies``). The file is written to a
temporary folder beside the output, run in ONNX Runtime at every checked batch size
against the PyTorch model, and moved into place only if every check is within the
contract's tolerance.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import dynconv
from dynconv.core import record_strategies
from dynconv.core.rules import fixed_batch_form

from .atomic import staged_output
from .errors import UserError, WorkFailedError, check_output_path, first_line
from .folding import FoldResult, fold_batchnorm
from .preprocessing import resolve_preprocessing
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
    batch: int | None = None  # None: the batch axis is dynamic
    strategies: dict[str, int] = field(default_factory=dict)  # core form -> dynamic layers traced with it


#: The packages of the optional ``export`` extra (pyproject.toml), named as the README names them.
EXPORT_EXTRA = ("onnx", "onnxscript", "onnxruntime")


def missing_export_packages() -> list[str]:
    """The packages of the ``export`` extra that cannot be imported here."""
    missing = []
    for name in EXPORT_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _onnxruntime():  # the module; imported late because export is an optional extra
    missing = missing_export_packages()
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ExportDependencyError(
            f"ONNX export needs dynconv's export extra, and {', '.join(missing)} {verb} missing; install the "
            'extra with pip install -e ".[export]" in the dynconv source folder (pip install "dynconv[export]" '
            "from a package index)"
        )
    import onnxruntime

    return onnxruntime


@contextlib.contextmanager
def _forms_for_batch(model: nn.Module, batch: int | None) -> Iterator[None]:
    """Pin every unpinned dynamic layer to its fixed-batch form while tracing (nothing for a dynamic batch)."""
    layers = [m for m in model.modules() if isinstance(m, dynconv.DynamicConv2d) and m.strategy is None]
    if batch is not None:
        for layer in layers:
            layer.strategy = fixed_batch_form(layer, batch)
    try:
        yield
    finally:
        if batch is not None:
            for layer in layers:
                layer.strategy = None


def _trace(
    model: nn.Module, example: torch.Tensor, opset: int | None, batch: int | None
) -> tuple[torch.onnx.ONNXProgram, list[str]]:
    with _forms_for_batch(model, batch), record_strategies() as chosen, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=None if batch is not None else ({0: torch.export.Dim("batch")},),
                input_names=["input"],
                output_names=["output"],
                opset_version=opset,
                verbose=False,
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx could not export {type(model).__name__}: {first_line(exc)}") from None
    return program, chosen


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
    batch: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    fold_bn: bool = False,
    check_batches: Sequence[int] | None = None,
    overwrite: bool = False,
    opset: int | None = None,
) -> ExportResult:
    """Export ``model`` (eval mode) to ONNX; check it in ONNX Runtime; write it atomically.

    ``batch=None`` keeps the batch axis dynamic (checked at ``check_batches``, default
    1 and 3); a number exports a graph for that batch size only, with the fastest core
    form for it (checked at that batch).
    ``input_shape`` is ``(C, H, W)`` (default: what the model expects). With ``fold_bn``
    every BatchNorm that directly follows a conv is folded into it first; the check
    still compares against ``model`` unfolded, so it covers the fold too. Raises
    :class:`ExportError` (and writes nothing) if ONNX Runtime differs beyond tolerance.
    """
    from .probe import default_input_size

    start = time.perf_counter()
    path = Path(path)
    check_output_path(path, overwrite)
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise UserError(f"batch must be a positive integer or None (dynamic), got {batch!r}")
    if check_batches is None:
        check_batches = CHECK_BATCHES if batch is None else (batch,)
    if not check_batches or min(check_batches) < 1:
        raise UserError(f"check batch sizes must be positive, got {list(check_batches)}")
    if batch is not None and set(check_batches) != {batch}:
        raise UserError(f"a graph exported for batch {batch} runs only at that batch, not at {list(check_batches)}")
    ort = _onnxruntime()
    input_shape = tuple(input_shape or default_input_size(model))  # type: ignore[assignment]
    folded = fold_batchnorm(model) if fold_bn else None
    target = folded.model if folded else model
    example = torch.randn(batch or 2, *input_shape, generator=torch.Generator().manual_seed(1))
    was_training = target.training
    try:  # export the eval-mode model in place: no copy of a possibly large model
        program, chosen = _trace(target.eval(), example, opset, batch)
    finally:
        target.train(was_training)
    traced = dict(Counter(chosen))
    program.model.metadata_props["dynconv.version"] = dynconv.__version__
    program.model.metadata_props["dynconv.dynamic_layers"] = str(len(dynconv.dynamic_layers(target)))
    program.model.metadata_props["dynconv.folded_batchnorms"] = str(len(folded.folded) if folded else 0)
    program.model.metadata_props["dynconv.batch"] = "dynamic" if batch is None else str(batch)
    program.model.metadata_props["dynconv.strategies"] = json.dumps(traced, sort_keys=True)
    program.model.metadata_props["dynconv.preprocessing"] = json.dumps(resolve_preprocessing(model).to_dict())
    with staged_output(path) as staged:
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
    opset_used = next((v for d, v in program.model.opset_imports.items() if d == ""), opset or 0)
    seconds = time.perf_counter() - start
    return ExportResult(path, input_shape, int(opset_used), checks, folded, seconds, batch, traced)
