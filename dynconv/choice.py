"""Which strategy a core call runs: the measured preference per shape, scopes that restrict
the choice, and a record of what ran (what an export traced).

The strategies themselves live in :mod:`dynconv.strategies`; this module only orders
them. ``serves_any_batch`` decides whether a graph being built must run at every batch
size (torch.export with a symbolic batch, torch.compile), which rules out forms that
bake the batch into the graph.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from .geometry import ConvGeometry
from .strategies import EXPORTABLE_STRATEGIES, STRATEGIES


def is_symbolic(batch: int | torch.SymInt) -> bool:
    """Whether the batch size is a symbol (torch.export with a dynamic batch)."""
    return not isinstance(batch, int)


def serves_any_batch(batch: int | torch.SymInt) -> bool:
    """Whether the graph being built must run at other batch sizes: a symbolic batch (torch.export)
    or torch.compile, whose dynamo shows a dynamic batch as an int. Batch 1 keeps its own
    graph (dynamo and export specialise it anyway), and asking ``batch == 1`` only of an
    int adds no guard."""
    if is_symbolic(batch):
        return True
    return torch.compiler.is_compiling() and batch != 1


def applicable(name: str, batch: int, geom: ConvGeometry, modulated: bool = False) -> bool:
    """Whether strategy ``name`` can compute this call at all (for a symbolic batch: for every batch).

    A ``modulated`` call (:class:`KernelTerms` on the kernel) needs per-sample kernels: not ``output``.
    """
    if modulated and name == "output":
        return False
    if is_symbolic(batch):
        return name in EXPORTABLE_STRATEGIES and (name != "matmul" or geom.pointwise)
    if name == "single":
        return batch == 1
    if name == "matmul":
        return geom.pointwise
    return name in STRATEGIES


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
    """Collect the strategy of every core call inside the block (what an export traced)."""
    previous = getattr(_scope, "record", None)
    _scope.record = chosen = []
    try:
        yield chosen
    finally:
        _scope.record = previous


def note_strategy(name: str) -> None:
    """Add ``name`` to the active :func:`record_strategies` list, if any."""
    record = getattr(_scope, "record", None)
    if record is not None:
        record.append(name)


def preference(
    batch: int,
    c_in: int,
    out_hw: tuple[int, int],
    geom: ConvGeometry,
    needs_grad: bool,
    kernel_bytes: int = 0,
    experts: int = 4,
) -> tuple[str, ...]:
    """Strategies in the order this machine's measurements favour for the call's shape.

    The order comes from ``benchmarks/core.py`` and ``benchmarks/models.py`` (2-thread
    CPU, see ``benchmarks/results/``): 1x1 kernels are fastest as a batched matmul,
    even at batch 1 (one expert on a map smaller than its input channels: the output
    scaled after one shared matmul); other kernels at batch 1 as one plain conv; otherwise chunks of
    the batch folded into conv groups, except on very small maps: training there is
    fastest as im2col + batched matmul, and inference with big kernels (ResNet-18
    layer4) as output mixing, whose K-fold MACs cost less than writing a 9 MB mixed
    kernel per sample.
    """
    pixels = out_hw[0] * out_hw[1]
    per_group_in = c_in // geom.groups
    if serves_any_batch(batch):  # one graph for every batch: no branch on its value, nothing folded into groups
        return batch_agnostic_preference(pixels, per_group_in, geom, kernel_bytes, experts)
    if geom.pointwise and per_group_in > 1:
        if experts == 1 and pixels < per_group_in:
            # one expert on a map with fewer pixels than input channels: scaling the output
            # costs less than a per-sample copy of the kernel (DCD's Lambda on MobileNet's 7x7 1x1s)
            return ("output", "matmul", "single", "grouped", "unfold", "loop")
        return ("matmul", "single", "grouped", "unfold", "loop", "output")
    taps = geom.kernel[0] * geom.kernel[1]
    if experts == 1 and (batch != 1 or pixels <= per_group_in * taps):
        # output mixing of one expert is the static conv and one scaling pass over the output:
        # cheaper than scaling the kernel whenever the output map is the smaller of the two
        return ("output", "single", "grouped", "unfold", "loop")
    if batch == 1:
        return ("single", "grouped", "loop", "unfold", "output")
    if per_group_in == 1:
        return ("grouped", "loop", "output", "unfold")
    small = pixels * experts <= SMALL_MAP_PIXELS * 4  # K=4: maps up to 8x8
    if needs_grad and pixels <= SMALL_MAP_PIXELS:
        return ("unfold", "grouped", "loop", "output")
    if small and kernel_bytes >= OUTPUT_MIN_KERNEL_BYTES:
        return ("output", "grouped", "unfold", "loop")
    return ("grouped", "unfold", "loop", "output")


# Training on maps this small (ResNet-18 layer4, 7x7) is fastest as im2col + bmm,
# whose weight gradient is one batched matmul instead of B small ones.
SMALL_MAP_PIXELS = 8 * 8
# Inference on small maps: output mixing beats the fold from per-sample kernels this big
# (ResNet-18 layer4, 512x512x3x3 fp32 = 9 MB: 57 vs 114 ms at batch 16; 256 channels,
# 2.4 MB: 12 vs 10 ms, so the fold stays).
OUTPUT_MIN_KERNEL_BYTES = 4 * 2**20


def batch_agnostic_preference(
    pixels: int, per_group_in: int, geom: ConvGeometry, kernel_bytes: int, experts: int = 4
) -> tuple[str, ...]:
    """The order for a graph that must serve any batch size (export or compile with a dynamic batch).

    1x1 kernels stay a batched matmul; depthwise kernels, big kernels on small maps and
    single-expert calls mix outputs (K times the MACs of a cheap conv, no per-sample
    kernel written); the rest is im2col + batched matmul.
    """
    if geom.pointwise and per_group_in > 1:
        return ("matmul", "unfold", "output")
    if experts == 1 or per_group_in == 1 or (pixels <= SMALL_MAP_PIXELS and kernel_bytes >= OUTPUT_MIN_KERNEL_BYTES):
        return ("output", "unfold")
    return ("unfold", "output")


def choose(
    batch: int,
    c_in: int,
    out_hw: tuple[int, int],
    geom: ConvGeometry,
    needs_grad: bool,
    kernel_bytes: int = 0,
    experts: int = 4,
    modulated: bool = False,
) -> str:
    """The strategy to run: the first preferred one the active scope allows."""
    allowed = allowed_strategies()
    for name in preference(batch, c_in, out_hw, geom, needs_grad, kernel_bytes, experts):
        if (allowed is None or name in allowed) and applicable(name, batch, geom, modulated):
            return name
    if allowed is not None:
        for name in allowed:
            if applicable(name, batch, geom, modulated):
                return name
    raise ValueError(f"no strategy in {allowed!r} can compute a {geom.kernel} conv at batch {batch}")
