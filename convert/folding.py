"""BatchNorm folding for deployment: find conv -> BatchNorm pairs in the model graph, fold them.

Pairs come from a ``torch.fx`` trace, with dynamic layers (and timm's no-trace modules)
kept as leaves. A pair counts only when the BatchNorm's input is the conv's output and
nothing else reads that output, so a fold never changes what another branch sees.
Dynamic convs fold through :func:`dynconv.fold_batchnorm_`; static convs through
``torch.nn.utils.fusion``. The folded model is an eval-mode model: with the BatchNorm
gone, it no longer normalises by batch statistics and should not be fine-tuned.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dynconv import DynamicConv2d, fold_batchnorm_

from .conv_classes import UnsupportedConvError, conversion_options
from .errors import UserError, first_line
from .surgery import set_module

#: Attribute a folded model carries: the folded ``(conv, batchnorm)`` name pairs.
FOLDED_ATTR = "dynconv_folded_batchnorm"


class FoldError(UserError):
    """The model's graph could not be traced, so no conv -> BatchNorm pair can be proven."""


@dataclass(frozen=True)
class FoldedPair:
    """One BatchNorm folded into the conv before it; ``shift`` says where its constant went."""

    conv: str
    batchnorm: str
    kind: str  # the dynamic kind, or "static"
    shift: str  # "bias" (the experts' or the conv's) or "static_bias" (sigmoid routing)


@dataclass(frozen=True)
class UnfoldedNorm:
    """A BatchNorm left in place, with the reason."""

    name: str
    reason: str


@dataclass
class FoldResult:
    """The folded model (eval mode) and what happened to every BatchNorm2d."""

    model: nn.Module
    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[UnfoldedNorm] = field(default_factory=list)


def _timm_notrace() -> tuple[set[type], set]:
    try:
        from timm.layers import BatchNormAct2d
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    except ImportError:
        return set(), set()
    return set(get_notrace_modules()) | {BatchNormAct2d}, set(get_notrace_functions())


class _LeafTracer(fx.Tracer):
    """Keeps dynamic layers, BatchNorms and timm's no-trace modules whole."""

    def __init__(self) -> None:
        modules, functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(functions))
        self.leaves = (DynamicConv2d, _BatchNorm, *modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """The model's ``torch.fx`` graph with dynamic layers as leaves; :class:`FoldError` if it does not trace."""
    try:
        return _LeafTracer().trace(model)
    except Exception as exc:  # fx raises anything from TraceError to TypeError on data-dependent code
        raise FoldError(
            f"{type(model).__name__} does not trace with torch.fx ({first_line(exc)}), so its conv -> BatchNorm pairs "
            "cannot be found from the graph"
        ) from None


def _is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm2d whose forward is the stock one, or timm's BatchNormAct2d (BN, then drop and act)."""
    if not isinstance(module, nn.BatchNorm2d):
        return False
    return type(module).forward is _BatchNorm.forward or type(module).__name__ == "BatchNormAct2d"


def find_conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[UnfoldedNorm]]:
    """``(conv, batchnorm)`` names where the BatchNorm directly and solely consumes the conv's output."""
    graph = trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs: list[tuple[str, str]] = []
    skipped: list[UnfoldedNorm] = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_batchnorm(modules[node.target]):
            continue
        source = node.args[0] if node.args else None
        conv = modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        if not isinstance(conv, (nn.Conv2d, DynamicConv2d)):
            skipped.append(UnfoldedNorm(node.target, "its input is not the output of a conv"))
        elif len(source.users) != 1:
            skipped.append(UnfoldedNorm(node.target, f"the output of {source.target} is also used elsewhere"))
        elif calls[node.target] != 1 or calls[source.target] != 1:
            skipped.append(UnfoldedNorm(node.target, "the conv or the BatchNorm is called more than once"))
        else:
            pairs.append((source.target, node.target))
    return pairs, skipped


def _fold_static(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    if conversion_options(conv).get("standardize") is not None:
        raise UnsupportedConvError("the conv standardises its weight, which would undo a folded BatchNorm scale")
    if bn.running_mean is None:
        raise UnsupportedConvError("the BatchNorm keeps no running statistics")
    return fuse_conv_bn_eval(conv.eval(), bn.eval())


def _without_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a folded BatchNorm: nothing, or timm's drop + activation."""
    if type(bn).forward is _BatchNorm.forward:
        return nn.Identity()
    return nn.Sequential(bn.drop, bn.act)


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> FoldResult:
    """Fold every eval-mode BatchNorm2d that directly follows a conv into it; returns an eval-mode model.

    The result computes what ``model.eval()`` computes, to float tolerance, with fewer
    modules. BatchNorms that cannot be folded stay, each with its reason in ``skipped``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    pairs, skipped = find_conv_bn_pairs(model)
    result = FoldResult(model, skipped=skipped)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        try:
            if isinstance(conv, DynamicConv2d):
                shift = fold_batchnorm_(conv, bn)
                kind = conv.kind
            else:
                set_module(model, conv_name, _fold_static(conv, bn))
                kind, shift = "static", "bias"
        except (ValueError, UnsupportedConvError) as exc:
            result.skipped.append(UnfoldedNorm(bn_name, str(exc)))
            continue
        set_module(model, bn_name, _without_norm(bn))
        result.folded.append(FoldedPair(conv_name, bn_name, kind, shift))
    setattr(model, FOLDED_ATTR, [(p.conv, p.batchnorm) for p in result.folded])
    return result
