"""Routing that depends on the input from step 0, while the model still computes the original's function.

A freshly converted layer routes uniformly, and its experts differ only by small zero-sum
noise, so a router's gradient is small and the routing barely leaves uniform in a short
fine-tuning. :func:`calibrate_routing` starts it elsewhere: it makes the experts equal
where the routing's total is fixed, and then sets the router's output layer from a
calibration batch so that the routing varies from image to image along the directions in
which the router's input varies most (its principal components):

- softmax routing (DyConv, DyNet, ODConv's kernel attention): every input's weights sum to
  one, so with identical experts (their mean, which is what uniform routing mixed) any
  routing mixes back to the same kernel;
- CondConv's sigmoid routing: the experts are paired and each pair's logits are ``z`` and
  ``-z``, so ``sigmoid(z) + sigmoid(-z) = 1`` keeps every pair's total fixed; the two experts
  of a pair become their mean.

The function is unchanged (up to float rounding), but each expert now receives a gradient
weighted by its own, input-dependent routing, so the experts separate from the first step
and the routers then get gradients of their own. Only untrained (zeroed) routers are
calibrated; a weight-standardised layer (standardising the mean is not the mean of the
standardised experts) and a layer with nothing to route are left as they are, and said so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .inspection import dynamic_layers
from .layers.base import DynamicConv2d
from .layers.registry import layer_class
from .routing import RoutingHead

#: Standard deviation of each routing logit over the calibration batch (after the temperature).
DEFAULT_SPREAD = 1.0
#: Principal components of the router's input that the logits are random mixtures of.
COMPONENTS = 8
#: Training batches ``dynconv finetune`` calibrates on when the model's kinds ask for it (the benchmark's setting).
DEFAULT_CALIBRATION_BATCHES = 4


@dataclass
class CalibrationReport:
    """What :func:`calibrate_routing` did: layers calibrated (with their routing style) and those left alone."""

    calibrated: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    samples: int = 0


def default_calibration_batches(kinds: Iterable[str]) -> int:
    """Batches to calibrate on when nobody said: :data:`DEFAULT_CALIBRATION_BATCHES` if there are dynamic layers and
    every one's kind calibrates by default (CondConv), else 0 (a model mixing kinds keeps uniform routing and any
    temperature annealing)."""
    kinds = set(kinds)
    if kinds and all(layer_class(kind).calibrates_by_default for kind in kinds):
        return DEFAULT_CALIBRATION_BATCHES
    return 0


def routing_head(layer: DynamicConv2d) -> RoutingHead | None:
    """Where ``layer``'s expert logits come from and how they are normalised (``softmax``/``pairs``)."""
    head = getattr(layer.router, "calibration_head", None)
    return None if head is None else head()


def _refusal(layer: DynamicConv2d) -> str | None:
    if layer.experts < 2:
        return "one expert: nothing to route"
    if routing_head(layer) is None:
        return f"{layer.kind} has no routing over experts to calibrate"
    if layer.standardize is not None:
        return "weight-standardised experts: the standardised mean is not the mean of the standardised experts"
    if any(bool(p.detach().abs().sum()) for p in layer.router.zeroed_parameters()):
        return "its router is already trained (not zero), so the routing is left as it is"
    return None


def _logit_weights(features: Tensor, count: int, spread: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(weight [count, F], bias [count])`` whose logits on ``features`` have mean 0 and std ``spread`` each."""
    feats = features.double()
    mean = feats.mean(0)
    centred = feats - mean
    _, singular, vt = torch.linalg.svd(centred, full_matrices=False)
    rank = int((singular > singular.max() * 1e-6).sum()) if singular.numel() else 0
    if rank == 0:
        raise ValueError("the router's input does not vary over the calibration batch")
    basis = vt[: min(COMPONENTS, rank)]  # [m, F]
    mixing = torch.randn(count, basis.shape[0], generator=generator, dtype=torch.float64)
    weight = mixing @ basis  # [count, F]
    std = (centred @ weight.T).std(0, unbiased=False)
    weight = weight * (spread / std).unsqueeze(1)
    return weight, -(weight @ mean)


def _average_experts(layers: list[DynamicConv2d], style: str) -> None:
    """Experts equal where the routing's total is fixed: all of them (softmax) or each pair (sigmoid)."""
    with torch.no_grad():
        for layer in layers:
            for bank in (layer.weight, layer.bias):
                if bank is None:
                    continue
                if style == "softmax":
                    bank.copy_(bank.mean(0, keepdim=True).expand_as(bank))
                    continue
                for first in range(0, layer.experts - 1, 2):
                    bank[first : first + 2] = bank[first : first + 2].mean(0, keepdim=True)


def _set_head(head: RoutingHead, features: Tensor, spread: float, generator: torch.Generator) -> None:
    style, rows = head.style, head.weight.shape[0]
    count = rows if style == "softmax" else rows // 2
    weight, bias = _logit_weights(features, count, spread, generator)
    if style == "pairs":  # rows 2j and 2j+1 give z and -z; an odd last expert keeps its zero row
        weight = torch.stack([weight, -weight], 1).reshape(-1, weight.shape[1])
        bias = torch.stack([bias, -bias], 1).reshape(-1)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[: weight.shape[0]] = weight.to(head.weight)
        if head.bias is not None:
            head.bias.zero_()
            head.bias[: bias.shape[0]] = bias.to(head.bias)


@torch.no_grad()
def calibrate_routing(
    model: nn.Module, batches: Iterable[Tensor], *, spread: float = DEFAULT_SPREAD, seed: int = 0
) -> CalibrationReport:
    """Make every fresh router of ``model`` input-dependent from ``batches``, keeping the model's function.

    Each routing logit becomes a random mix of the top principal components of its
    router's input over the batches, centred and scaled to standard deviation ``spread``
    (after the softmax temperature, which is set to 1: calibrated routers are not
    annealed). Run it once, on a converted model before fine-tuning; ``batches`` are
    images as the model takes them (a few hundred is plenty).
    """
    if spread <= 0:
        raise ValueError(f"spread must be positive, got {spread}")
    report = CalibrationReport()
    groups: dict[int, list[tuple[str, DynamicConv2d]]] = {}
    for name, layer in dynamic_layers(model).items():
        reason = _refusal(layer)
        if reason is not None:
            report.skipped[name] = reason
        else:
            groups.setdefault(id(layer.router), []).append((name, layer))
    if not groups:
        return report
    features: dict[int, list[Tensor]] = {key: [] for key in groups}
    handles = []
    for key, members in groups.items():
        module = routing_head(members[0][1]).module
        handles.append(module.register_forward_hook(lambda _m, args, _out, key=key: features[key].append(args[0])))
    was_training = model.training
    model.eval()
    try:
        for images in batches:
            model(images)
            report.samples += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if report.samples < 2:
        raise ValueError(f"calibration needs at least 2 images, got {report.samples}")
    generator = torch.Generator().manual_seed(seed)
    for key, members in groups.items():
        layer = members[0][1]
        head = routing_head(layer)
        temperature = getattr(layer.router, "temperature", None)
        if not features[key]:
            report.skipped.update({name: "it did not run on the calibration batches" for name, _ in members})
            continue
        try:
            _set_head(head, torch.cat(features[key]).flatten(1).cpu(), spread, generator)
        except ValueError as exc:
            report.skipped.update({name: str(exc) for name, _ in members})
            continue
        if temperature is not None:
            temperature.fill_(1.0)
        _average_experts([member for _, member in members], head.style)
        report.calibrated.update({name: head.style for name, _ in members})
    return report
