"""Every rule that orders or picks a form: the measured preference per shape, the batch-agnostic and
fixed-batch export orders, the kinds' own path rules, when the compile op is opaque, how much of a
batch one grouped conv folds.

Each threshold comes from a benchmark on the 2-core CPU (``benchmarks/core.py``,
``models.py``, ``layers.py``, ``deploy.py``; results in ``benchmarks/results/``). The forms
themselves and their capabilities are in :mod:`dynconv.core.forms`; this module only orders
them, and :func:`applicable` reads the capabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..geometry import ConvGeometry
from .forms import FORMS
from .scope import allowed_strategies


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
    """Whether core form ``name`` can compute this call at all (for a symbolic batch: for every batch).

    Read from the form's capabilities: a ``modulated`` call (kernel terms) needs a form that
    takes them, a symbolic batch a batch-agnostic one.
    """
    form = FORMS.get(name)
    if form is None or form.compute is None:
        return False
    if modulated and not form.takes_terms:
        return False
    if form.pointwise_only and not geom.pointwise:
        return False
    if is_symbolic(batch):
        return form.batch_agnostic and form.exportable
    return not form.batch_one_only or batch == 1


def runs_as_matmul(geom: ConvGeometry, c_in: int) -> bool:
    """A 1x1 conv that reads more than one input channel per group: a matrix product per pixel."""
    return geom.pointwise and c_in // geom.groups > 1


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
        return batch_agnostic_preference(pixels, c_in, geom, kernel_bytes, experts)
    if runs_as_matmul(geom, c_in):
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
    pixels: int, c_in: int, geom: ConvGeometry, kernel_bytes: int, experts: int = 4
) -> tuple[str, ...]:
    """The order for a graph that must serve any batch size (export or compile with a dynamic batch).

    1x1 kernels stay a batched matmul; depthwise kernels, big kernels on small maps and
    single-expert calls mix outputs (K times the MACs of a cheap conv, no per-sample
    kernel written); the rest is im2col + batched matmul.
    """
    if runs_as_matmul(geom, c_in):
        return ("matmul", "unfold", "output")
    if (
        experts == 1
        or c_in // geom.groups == 1
        or (pixels <= SMALL_MAP_PIXELS and kernel_bytes >= OUTPUT_MIN_KERNEL_BYTES)
    ):
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
    channels_last: bool = False,
) -> str:
    """The strategy to run: the first preferred one the active scope allows (``channels_last``: the input's layout)."""
    allowed = allowed_strategies()
    order = preference(batch, c_in, out_hw, geom, needs_grad, kernel_bytes, experts)
    if channels_last and not needs_grad:
        order = per_sample_on_channels_last(order, c_in // geom.groups)
    for name in order:
        if (allowed is None or name in allowed) and applicable(name, batch, geom, modulated):
            return name
    if allowed is not None:
        for name in allowed:
            if applicable(name, batch, geom, modulated):
                return name
    raise ValueError(f"no strategy in {allowed!r} can compute a {geom.kernel} conv at batch {batch}")


def per_sample_on_channels_last(order: tuple[str, ...], per_group_in: int) -> tuple[str, ...]:
    """``order`` for a channels_last input at inference: a depthwise kernel (``per_group_in == 1``)
    runs one conv per sample before the fold.

    The fold needs each sample's channels contiguous: on channels_last maps it copies the
    input and the output of every layer. Per-sample convs read the maps where they are
    and write channels_last. This is the layout torch.compile gives the opaque op for such
    kernels (see :mod:`dynconv.core.opaque`); measured compiled, CondConv / compiled static at
    batch 16: EfficientNet-B0 2.47x -> 1.51x (1 thread), 1.42x at 2 threads; MobileNetV2
    1.85x -> 1.58x (1 thread). Dense kernels keep the fold (per sample, ResNet-18 measured
    slower at 2 threads).
    """
    if per_group_in == 1 and order and order[0] == "grouped":
        return ("loop", *(name for name in order if name != "loop"))
    return order


# --- how much of a batch one grouped conv folds ---------------------------------------------


def fold_chunk(batch: int, kernel_bytes: int, needs_grad: bool) -> int:
    """Samples folded into one grouped conv: enough for weight reuse, few enough that the
    mixed kernels (``chunk * kernel_bytes``) stay cache-sized instead of streaming memory."""
    cap = FOLD_MAX_CHUNK_GRAD if needs_grad else FOLD_MAX_CHUNK
    return max(1, min(batch, cap, FOLD_BUDGET_BYTES // max(kernel_bytes, 1)))


# Measured on the 2-core CPU (benchmarks/core.py): mixing all B kernels at once
# streams B * |W| bytes through memory (302 MB for ResNet-18 layer4 at batch 32) and
# costs more than the convolution; chunks of about 20 MB stay in cache.
FOLD_BUDGET_BYTES = 20 * 2**20
FOLD_MAX_CHUNK = 8
FOLD_MAX_CHUNK_GRAD = 16


# --- graphs of one fixed batch size (ONNX export with --batch-size N) -----------------------


def fixed_batch_form(layer: Any, batch: int) -> str | None:
    """The form for a graph of one batch size, the fastest measured in ONNX Runtime (benchmarks/deploy.py).

    ``layer`` is a dynamic layer (``in_channels``, ``groups``, ``padding_mode``, its geometry).
    At batch 1, 1x1 kernels run as a MatMul with the mixed kernel and the rest as one
    Conv with it; at a larger batch every kernel runs with the batch folded into the
    conv's groups (output mixing for depthwise kernels and batched matmul for 1x1
    ones measured slower there). ``None`` at batch 1 for a layer whose kind keeps its kernel
    static (DCD, ODConv 1x): its own deployment form, not a pinned core form (at batch 16 the
    fold measured 2.40x static on MobileNetV2 DCD, the deployment form 3.06x).
    """
    if batch == 1 and (layer.kind == "dcd" or (layer.kind == "odconv" and layer.experts == 1)):
        return None  # their own deployment forms keep the kernel static (dcd_keeps_kernel_static, odconv_path)
    if batch == 1:
        pointwise = runs_as_matmul(layer._geometry, layer.in_channels) and layer.padding_mode == "zeros"
        return "matmul" if pointwise else "single"
    return "grouped"


# --- torch.compile: the opaque op --------------------------------------------------------


def goes_opaque(batch: int | torch.SymInt, needs_grad: bool, strategy: str | None) -> bool:
    """Whether a call runs as the opaque compile op (:mod:`dynconv.core.opaque`): compiling a graph
    that serves any batch, for inference, with no forced strategy. Batch 1 gets its own graph
    anyway and stays traced (fused); exports stay in standard ops."""
    if strategy is not None or needs_grad or not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return serves_any_batch(batch)


def opaque_on_channels_last(geom: ConvGeometry, per_group_in: int, modulated: bool) -> bool:
    """Whether the opaque op gets a call's maps channels_last (see :mod:`dynconv.core.opaque`): 1x1 and
    depthwise kernels without kernel terms, whose forms read such maps in place (a matmul over
    pixels, :func:`per_sample_on_channels_last`)."""
    return not modulated and (geom.pointwise or per_group_in == 1)


# --- the kinds' own paths ----------------------------------------------------------------

#: ODConv 1x on k x k maps up to this many output pixels: rescaled im2col and one static GEMM
#: beat per-sample kernels (scaled, then folded into conv groups at batch > 1). Measured on
#: ResNet-18's shapes: 1.9x vs 4.4x static on 7x7 at batch 16, but 4.4x vs 2.3x on 14x14.
RESCALED_MAX_PIXELS = 8 * 8


def odconv_path(
    input_shape: Sequence[int], weight_shape: Sequence[int], geom: ConvGeometry, has_taps: bool, strategy: str | None
) -> str:
    """How ODConv computes a call: ``"rescaled"`` (im2col scaled by the attentions, one static
    GEMM), ``"maps"`` (channel attentions on the input and output maps, the core for the rest)
    or ``"core"`` (every attention a kernel factor in the core). A forced ``strategy`` is ``"core"``.

    Rescaled: one expert, no groups, a tap attention and a small output map. Maps: where the
    maps cost fewer multiplications than the kernel (``C_in H W + C_out H' W'`` against
    ``C_out C_in/g kH kW`` and its per-sample copy; benchmarks/results/layers.md: on 56x56 and
    larger maps two passes over the maps cost more than the per-sample kernels they save).
    Depthwise kernels (one input channel per group) are always the smaller. In an export ODConv 1x
    always takes the maps: its kernel stays a constant (scaled by the tap attention only where it has
    taps), which a runtime pre-packs.
    """
    if strategy is not None:
        return "core"
    experts, c_out, per_group, kh, kw = weight_shape
    if experts == 1 and torch.compiler.is_exporting():
        return "maps"
    h_out, w_out = geom.output_size(input_shape[-2], input_shape[-1])
    if experts == 1 and geom.groups == 1 and has_taps and h_out * w_out <= RESCALED_MAX_PIXELS:
        return "rescaled"
    if per_group > 1 and input_shape[1] * input_shape[2] * input_shape[3] + c_out * h_out * w_out < (
        c_out * per_group * kh * kw
    ):
        return "maps"
    return "core"


def dcd_forms_whole_kernel(input_shape: Sequence[int], weight_shape: Sequence[int], geom: ConvGeometry) -> bool:
    """Whether DCD forms each sample's whole kernel ``Lambda W0 + P Phi Q`` and runs it through the core,
    rather than the static kernel scaled by ``Lambda`` plus the low-rank term on the centre taps.

    Whole: depthwise convs (folded into conv groups like the static conv, no extra pass over
    any map) and 1x1 convs on maps with more pixels than the kernel has rows and columns
    (a batched matmul: forming it costs less).
    """
    c_out, per_group = weight_shape[1], weight_shape[2]
    if per_group == 1:
        return True
    if not geom.pointwise:
        return False
    h_out, w_out = geom.output_size(input_shape[-2], input_shape[-1])
    return per_group * c_out <= 2 * h_out * w_out * (input_shape[1] + c_out)


def dcd_keeps_kernel_static() -> bool:
    """Whether DCD traces its deployment form (``W0`` a constant conv, ``Lambda`` and ``P Phi Q`` on the
    maps) rather than a per-sample kernel: in every graph (ONNX, torch.export, torch.compile) that does
    not pin a core form (a fixed batch above 1 pins the fold, :func:`fixed_batch_form`), for every shape.

    A constant ``W0`` is what a runtime pre-packs; measured in ONNX Runtime at batch 1 (MobileNetV2,
    1 thread, CPU time) the form on every layer costs 2.37x static, against 2.72x with per-sample
    kernels on the depthwise and large-map 1x1 layers. Under torch.compile, inductor fuses ``Lambda``
    and the centre term into its own kernels, where per-sample kernels behind the opaque op cost a
    layout copy around every layer once a static conv puts the graph in channels_last (EfficientNet-B0,
    1 thread, compiled / compiled static: 2.25x -> 1.57x at batch 16, 2.22x -> 1.50x at batch 1;
    ResNet-18 1.21x -> 1.10x; MobileNetV2 unchanged at 1.6-1.7x). Eager keeps its own choice: ``W0``
    static on k x k and small-map 1x1 convs (the core's output form), per-sample kernels where
    :func:`dcd_forms_whole_kernel` measured them cheaper in PyTorch.
    """
    return torch.compiler.is_compiling()
