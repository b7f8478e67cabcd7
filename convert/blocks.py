"""Finding a model's blocks from what its forward does, not from module names.

A *block* is a module whose one call runs several converted convs, each once, where the
first of them reads the block's own input: torchvision's ``InvertedResidual``, ``MBConv``,
``BasicBlock``/``Bottleneck``, timm's ``InvertedResidual``, ``EdgeResidual``,
``DepthwiseSeparableConv``, ``Bottleneck`` all are. One probe forward with hooks records,
for every module, the converted convs that ran inside its call and whether each read the
module's input tensor. Blocks are then the smallest such modules (of those running the
same convs, the outermost that is not a plain ``nn.Sequential``: ``features.5.0`` rather
than its inner ``features.5.0.block`` or a one-block stage ``features.7``), each widened to
its outermost ancestor that is no ``nn.Sequential`` and holds no other block (a RegNet
block with its side projection rather than the transform alone). A stage that runs
several blocks is never a block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dynconv import DynamicConv2d


@dataclass
class ModuleCall:
    """What one module's calls ran: converted convs (in order), and whether each read the module's input."""

    name: str
    type: str
    container: bool  # an nn.Sequential: a block's inner body or a stage, never preferred as the block
    calls: int = 0
    layers: list[str] = field(default_factory=list)
    reads_input: list[bool] = field(default_factory=list)


@dataclass
class Block:
    """A module that qualifies as a block, and the converted convs its call runs, in order."""

    name: str
    type: str
    layers: list[str]
    reads_input: list[bool]  # per layer: its input is the block's input

    @property
    def reason(self) -> str:
        """Why this module is a block, in one sentence."""
        return (
            f"{self.type} runs {len(self.layers)} converted convs once per call, "
            f"and the first ({self.layers[0]}) reads the block's input"
        )


@dataclass
class BlockSurvey:
    """The blocks found, and for every converted conv in none, why (from its smallest enclosing module)."""

    blocks: list[Block]
    outside: dict[str, str]


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``["a.b", "a"]`` (the root excluded)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def record_calls(
    model: nn.Module, layers: dict[str, DynamicConv2d], run: Callable[[], object]
) -> tuple[dict[str, ModuleCall], dict[str, int]]:
    """Run ``run()`` with hooks; return per module what its calls ran, and per layer its call count."""
    inside = {id(m) for layer in layers.values() for m in layer.modules()}
    names_of = {id(layer): name for name, layer in layers.items()}
    records: dict[str, ModuleCall] = {}
    counts = dict.fromkeys(layers, 0)
    stack: list[tuple[ModuleCall, object]] = []
    handles = []

    def enter(record: ModuleCall) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            record.calls += 1
            stack.append((record, args[0] if args else None))

        return hook

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        stack.pop()

    def conv_called(module: nn.Module, args: tuple) -> None:
        name = names_of[id(module)]
        counts[name] += 1
        x = args[0] if args else None
        for record, block_input in stack:
            record.layers.append(name)
            record.reads_input.append(x is not None and x is block_input)

    for name, module in model.named_modules():
        if not name or id(module) in inside:
            continue
        record = records[name] = ModuleCall(name, type(module).__name__, isinstance(module, nn.Sequential))
        handles.append(module.register_forward_pre_hook(enter(record)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    for layer in layers.values():
        handles.append(layer.register_forward_pre_hook(conv_called))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return records, counts


def _refusal(record: ModuleCall, counts: dict[str, int]) -> str | None:
    """Why a module that runs two or more converted convs is not a block, or ``None``."""
    if record.calls != 1:
        return f"it is called {record.calls} times in one forward"
    repeated = next((n for n in record.layers if counts[n] != 1), None)
    if repeated is not None:
        return f"its conv {repeated} runs {counts[repeated]} times in one forward"
    if not record.reads_input[0]:
        return f"its first converted conv ({record.layers[0]}) reads a transformed input, not the module's own"
    return None


def find_blocks(model: nn.Module, layers: dict[str, DynamicConv2d], input_shape: tuple[int, int, int]) -> BlockSurvey:
    """The blocks of ``model`` around its converted ``layers`` (by name), from one eval forward at batch 1."""
    param = next(model.parameters(), None)
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    if param is not None:
        x = x.to(param.device, param.dtype)
    was_training = model.training

    def run() -> object:
        model.eval()
        with torch.no_grad():
            return model(x)

    try:
        records, counts = record_calls(model, layers, run)
    finally:
        model.train(was_training)
    several = {n: r for n, r in records.items() if len(r.layers) >= 2}
    # the smallest modules running several converted convs
    sets = {n: set(r.layers) for n, r in several.items()}
    minimal = [n for n in several if not any(other < sets[n] for other in sets.values())]
    # A block, its inner Sequential and a one-block stage run the same convs: take the block,
    # the outermost module of them that is not a plain Sequential (or the outermost one).
    outermost: dict[frozenset[str], str] = {}
    for n in minimal:
        if _refusal(several[n], counts) is None:
            key = frozenset(several[n].layers)
            rank = (several[n].container, n.count("."))
            if key not in outermost or rank < (several[outermost[key]].container, outermost[key].count(".")):
                outermost[key] = n
    blocks: list[Block] = []
    for name in outermost.values():
        chosen = name
        others = [sets[m] for m in minimal if sets[m] != sets[name]]  # other blocks, or modules refused as one
        for parent in _ancestors(name):  # widen while the ancestor adds single convs only (a side projection)
            record = several.get(parent)
            if record is None or record.container or _refusal(record, counts) is not None:
                break
            if any(other & sets[parent] for other in others):
                break
            chosen = parent
        record = several[chosen]
        blocks.append(Block(chosen, record.type, list(record.layers), list(record.reads_input)))
    in_block = {n for block in blocks for n in block.layers}
    outside: dict[str, str] = {}
    for layer in layers:
        if layer in in_block:
            continue
        around = [n for n in _ancestors(layer) if n in several]
        if not around:
            outside[layer] = "no module around it runs another converted conv"
            continue
        smallest = several[around[0]]
        where = f"{smallest.name} ({smallest.type}), the smallest module running it with other converted convs"
        if in_block & set(smallest.layers):
            outside[layer] = f"outside every block: {where}, runs whole blocks too"
        else:
            why = _refusal(smallest, counts) or "a smaller module inside it runs several of its convs"
            outside[layer] = f"not in a block: {where}, is none because {why}"
    return BlockSurvey(blocks, outside)
