"""Collapse dynamic layers whose routing barely varies back into static convs.

After fine-tuning, many layers route nearly the same way for every image. Such a layer
becomes the conv it was converted from, holding its kernel at the mean routing over
some data (:mod:`convert.collapse_kernels`): exact where the routing is constant, an
approximation elsewhere, whose effect is measured on the data rather than assumed.

:func:`collapse` measures each dynamic layer's mean routing and its spread (with the
accumulator of :mod:`convert.analyze`), the change collapsing it alone causes, and the
time it saves (the dynamic layer vs the static conv on the layer's own input, batch 1).
It then collapses layers in order of the change they cause, keeping a layer only while
the cumulative change stays within the budget (``max_drop``), or collapses all but the
``keep`` most-varying layers. The change is the accuracy drop in points on the data's
labels (``metric="accuracy"``) or the relative output change in percent,
``100 |y - y0| / |y0|`` over every output (``metric="output"``). The result keeps its
conversion record, listing the collapsed layers, so it saves as an ordinary checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import dynconv

from .analyze import _Accumulator
from .collapse_kernels import collapsed_conv, not_collapsible
from .converter import CONVERSION_ATTR, Conversion
from .errors import UserError
from .surgery import replace_all

#: A relative output change below this is float round-off: the collapse changed nothing.
ROUND_OFF = 1e-5
METRICS = ("accuracy", "output")


@dataclass
class LayerPlan:
    """One dynamic layer: how its routing varies, what collapsing it costs and saves, what was decided."""

    name: str
    kind: str
    names: list[str]  # every name the layer's module sits at (a shared conv sits at several)
    spread: float  # sqrt(mean |r - mean r|^2) / |mean r| over the data's routing vectors
    error: float | None = None  # the metric's change when this layer alone collapses
    saved_ms: float | None = None  # dynamic minus static time on the layer's input, batch 1
    collapsed: bool = False
    cumulative: float | None = None  # the metric's change with this and every earlier collapse
    reason: str | None = None  # why the layer stays dynamic


@dataclass
class CollapseResult:
    """The model with some layers collapsed, the plan that chose them, and what it changed on the data."""

    model: nn.Module
    layers: list[LayerPlan]
    metric: str
    images: int
    accuracy_before: float | None = None  # percent
    accuracy_after: float | None = None
    output_change: float = 0.0  # percent, relative, the collapsed model vs the input model
    budget: dict[str, Any] = field(default_factory=dict)

    @property
    def collapsed(self) -> list[str]:
        """Names of the collapsed layers (every name of a shared one)."""
        return [n for plan in self.layers if plan.collapsed for n in plan.names]

    @property
    def kept(self) -> list[str]:
        """Names of the layers that stay dynamic."""
        return [plan.name for plan in self.layers if not plan.collapsed]

    def summary(self) -> str:
        """One line: layers collapsed and kept, the time saved, the accuracy or output change."""
        done = [p for p in self.layers if p.collapsed]
        saved = sum(p.saved_ms or 0.0 for p in done)
        text = f"collapsed {len(done)} of {len(self.layers)} dynamic layers ({len(self.kept)} kept)"
        text += f" over {self.images} images"
        if any(p.saved_ms is not None for p in done):
            text += f", saving {saved:.2f} ms at batch 1 (sum of the layer timings)"
        if self.accuracy_before is not None and self.accuracy_after is not None:
            text += f"; accuracy {self.accuracy_before:.2f}% -> {self.accuracy_after:.2f}%"
        return text + f"; output change {self.output_change:.3g}% (relative)"

    def to_json(self) -> dict[str, Any]:
        """Every number, as plain JSON types (the model left out)."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("model", "layers")}
        data["layers"] = [dataclasses.asdict(p) for p in self.layers]
        return {**data, "collapsed": self.collapsed, "kept": self.kept, "summary": self.summary()}


Batch = tuple[Tensor, Tensor | None]


def _batches(loader: Iterable[Any]) -> list[Batch]:
    """The data once, in memory: ``(images, labels)`` pairs, or images alone (labels ``None``)."""
    batches: list[Batch] = []
    for item in loader:
        if isinstance(item, (tuple, list)):
            batches.append((item[0], item[1] if len(item) > 1 else None))
        else:
            batches.append((item, None))
    if not batches:
        raise UserError("the data is empty: there is no routing to measure")
    return batches


def _logits(net: nn.Module, batches: list[Batch]) -> Tensor:
    with torch.inference_mode():
        return torch.cat([net(images).float() for images, _ in batches])


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).double().mean())


def _output_change(logits: Tensor, reference: Tensor) -> float:
    return 100.0 * float((logits - reference).double().norm() / reference.double().norm().clamp_min(1e-30))


def _measure_routing(
    net: nn.Module, batches: list[Batch], names: list[str]
) -> tuple[dict[str, tuple[Tensor, float]], Tensor]:
    """Each layer's mean routing vector and relative spread, and the model's outputs, in one pass."""
    sums: dict[str, _Accumulator] = {}
    outputs = []
    with torch.inference_mode():
        for images, _ in batches:
            with dynconv.capture_routing(net) as routing:
                outputs.append(net(images).float())
            for name in names:
                if name in routing:
                    r = routing[name]
                    sums.setdefault(name, _Accumulator(r.shape[1], 1)).add(r, torch.zeros(len(r), dtype=torch.long))
    moments = {name: acc.vector_moments() for name, acc in sums.items()}
    return moments, torch.cat(outputs)


def module_inputs(model: nn.Module, names: Iterable[str], x: Tensor) -> dict[str, Tensor]:
    """The input each named submodule of ``model`` receives (its first call) in one inference forward on ``x``."""
    seen: dict[str, Tensor] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0]))
        for name in names
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _median_ms(module: nn.Module, x: Tensor, budget: float = 0.05) -> float:
    """Median wall time of ``module(x)`` in milliseconds (3 warm-up calls, then up to ``budget`` seconds)."""
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        end = time.perf_counter() + budget
        while len(times) < 5 or (time.perf_counter() < end and len(times) < 200):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _record_names(conversion: Conversion | None, name: str) -> list[str]:
    for record in conversion.layers if conversion is not None else []:
        if name in record["names"]:
            return list(record["names"])
    return [name]


def _collapsed_record(conversion: Conversion, names: list[str]) -> Conversion:
    """The conversion record without the collapsed layers, listing them as collapsed."""
    gone = set(names)
    layers = [r for r in conversion.layers if not gone & set(r["names"])]
    return dataclasses.replace(conversion, layers=layers, collapsed=[*conversion.collapsed, *names])


def _check_options(metric: str | None, labelled: bool, max_drop: float | None, keep: int | None) -> str:
    if max_drop is not None and keep is not None:
        raise UserError("give either a budget (max_drop) or a number of layers to keep (keep), not both")
    if max_drop is not None and (max_drop < 0 or not math.isfinite(max_drop)):
        raise UserError(f"max_drop must be a finite number >= 0, got {max_drop}")
    if keep is not None and keep < 0:
        raise UserError(f"keep must be >= 0, got {keep}")
    metric = metric or ("accuracy" if labelled else "output")
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric == "accuracy" and not labelled:
        raise UserError("the accuracy metric needs labelled data ((images, labels) batches); use metric='output'")
    return metric


def collapse(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    max_drop: float | None = None,
    keep: int | None = None,
    metric: str | None = None,
    time_layers: bool = True,
    progress: Callable[[str], None] | None = None,
) -> CollapseResult:
    """Collapse the dynamic layers of ``model`` whose routing over ``loader`` varies least (``model`` is not modified).

    ``loader`` yields ``(images, labels)`` or images; ``metric`` is ``"accuracy"`` (the
    default with labels: ``max_drop`` in accuracy points) or ``"output"`` (``max_drop`` as a
    relative output change in percent). ``keep=N`` keeps the ``N`` layers whose routing
    varies most instead; neither means ``max_drop=0.2``.
    """
    note = progress or (lambda _text: None)
    batches = _batches(loader)
    labelled = all(labels is not None for _, labels in batches)
    metric = _check_options(metric, labelled, max_drop, keep)
    if max_drop is None and keep is None:
        max_drop = 0.2
    net = copy.deepcopy(model).eval()
    conversion = getattr(net, CONVERSION_ATTR, None)
    layers = dynconv.dynamic_layers(net)
    if not layers:
        raise UserError("the model has no dynamic layer, so there is nothing to collapse")
    note("measuring the routing")
    moments, reference = _measure_routing(net, batches, list(layers))
    labels = torch.cat([lab for _, lab in batches]) if labelled else None
    before = None if labels is None else _accuracy(reference, labels)

    def change(logits: Tensor) -> float:
        if metric == "accuracy":
            return before - _accuracy(logits, labels)  # type: ignore[operator, arg-type]
        return _output_change(logits, reference)

    plans: dict[str, LayerPlan] = {}
    convs: dict[str, nn.Conv2d] = {}
    for name, layer in layers.items():
        mean, square = moments.get(name, (None, 0.0))
        spread = 0.0 if mean is None else math.sqrt(square) / max(float(mean.norm()), 1e-30)
        plan = LayerPlan(name, layer.kind, _record_names(conversion, name), spread)
        plan.reason = "did not run on the data" if mean is None else not_collapsible(layer)
        if plan.reason is None:
            convs[name] = collapsed_conv(layer, mean)
        plans[name] = plan
    if time_layers:
        note("timing each layer at batch 1")
        inputs = module_inputs(net, layers, batches[0][0][:1])
        for name, conv in convs.items():
            if name in inputs:
                plans[name].saved_ms = _median_ms(layers[name], inputs[name]) - _median_ms(conv, inputs[name])
    for i, (name, conv) in enumerate(convs.items()):
        note(f"collapsing each layer alone ({i + 1}/{len(convs)})")
        replace_all(net, plans[name].names, conv)
        plans[name].error = change(_logits(net, batches))
        replace_all(net, plans[name].names, layers[name])
    order = sorted(convs, key=lambda n: (plans[n].error, plans[n].spread))
    if keep is not None:
        varying = set(sorted(convs, key=lambda n: -plans[n].spread)[:keep])
        for name in varying:
            plans[name].reason = f"among the {keep} layers whose routing varies most"
        order = [n for n in order if n not in varying]
    for i, name in enumerate(order):
        note(f"collapsing in order ({i + 1}/{len(order)})")
        replace_all(net, plans[name].names, convs[name])
        value = change(_logits(net, batches))
        within = True if max_drop is None else value <= max_drop + 1e-9
        if metric == "output" and value <= 100 * ROUND_OFF:
            within = True
        if within:
            plans[name].collapsed, plans[name].cumulative = True, value
        else:
            replace_all(net, plans[name].names, layers[name])
            plans[name].reason = f"collapsing it too would change the {metric} by {value:.3g} (budget {max_drop})"
    final = _logits(net, batches)
    result = CollapseResult(
        net,
        list(plans.values()),
        metric,
        len(reference),
        accuracy_before=before,
        accuracy_after=None if labels is None else _accuracy(final, labels),
        output_change=_output_change(final, reference),
        budget={"max_drop": max_drop, "keep": keep},
    )
    if isinstance(conversion, Conversion):
        setattr(net, CONVERSION_ATTR, _collapsed_record(conversion, result.collapsed))
    return result
