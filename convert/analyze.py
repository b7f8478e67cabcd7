"""What the routers learned: routing statistics of a converted model over an image folder.

Runs the model over the images with :func:`dynconv.capture_routing` and, per dynamic
layer, accumulates (in float64, batch by batch, so memory does not grow with the data):

- ``mean_routing``: the mean routing weight per expert, as the layer uses it (CondConv's
  sigmoid weights need not sum to one);
- ``entropy``: the mean normalised entropy of the routing distribution (the weights
  divided by their sum), 1 = uniform over the experts, 0 = one expert only;
- ``top_share``: the share of routing decisions whose top expert is each expert (ties,
  as under the uniform routing of a fresh conversion, split equally);
- ``spread``: how far the expert kernels are apart, ``sqrt(mean_k |W_k - W_mean|^2) / |W_mean|``,
  and ``spread_at_conversion``, what the conversion's zero-sum noise gave,
  ``noise * sqrt((K - 1) / K)``: their ratio says how far the experts moved apart since;
- with classes (one subfolder per class): ``class_means``, the mean routing weights per
  class, and ``class_ratio``, the between-class over the within-class variance of the
  routing vectors (0 when the routing ignores the class, large when it is class-specific);
- ``margin``: how far the top expert of a decision stands above uniform, ``(max_k p_k - 1/K) /
  (1 - 1/K)`` averaged over decisions: 0 = uniform, 1 = one expert takes all;
- ``variation``: how much the routing changes from image to image, the RMS over experts of
  the standard deviation of ``p_k`` over the images, in units of the uniform weight ``1/K``;
- ``top_weight``: the mean weight ``p_k`` of the expert with the largest mean, so the share
  of the average kernel that one expert makes;
- ``verdict``: those three in words (see :func:`verdict`).

DyNet routes per output channel (``[B, K, C_out]``): each (sample, output channel) pair
is one routing decision for the entropy and the top expert; mean weights and class means
average over the output channels; the class ratio uses the whole ``K x C_out`` vector.
A block's shared router gives its layers the same routing, so their rows agree.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

import dynconv
from dynconv.experts import DEFAULT_NOISE

from .checkpoint import checkpoint_preprocessing, load_checkpoint
from .converter import CONVERSION_ATTR
from .errors import UserError
from .finetune import image_folder_splits
from .preprocessing import Preprocessing
from .recipe import name_matches

#: A routing weight within this relative distance of the largest counts as a tie for the top.
TIE = 1e-6
#: Below this margin over uniform (5% of the way to one expert) and this variation over images (a
#: routing weight moving by 5% of 1/K), the routing is the conversion's uniform one for all practical ends.
UNIFORM_BELOW = 0.05
#: One expert making at least this share of the average kernel: the layer is that expert, a static conv.
COLLAPSED_FROM = 0.9

UNIFORM = "uniform: routing has not learned"
COLLAPSED = "collapsed to one expert"
INPUT_DEPENDENT = "input-dependent"
FIXED_MIX = "fixed mix: the same for every input"
OFF = "off: every routing weight is 0"


def verdict(margin: float, variation: float, top_weight: float, experts: int) -> str:
    """What a layer's routing does, in words, from its measured statistics.

    Collapsed when one expert makes ``COLLAPSED_FROM`` of the average kernel; uniform when no
    decision leaves uniform by ``UNIFORM_BELOW`` and nor does any image; input-dependent when
    the routing varies over images by at least ``UNIFORM_BELOW`` of a uniform weight; else a
    fixed, non-uniform mix (the experts are averaged the same way for every image).
    """
    if experts > 1 and top_weight == 0.0:  # sigmoid routing saturated at 0: the layer outputs its bias only
        return OFF
    if experts > 1 and top_weight >= COLLAPSED_FROM:
        return COLLAPSED
    if experts == 1 or (margin < UNIFORM_BELOW and variation < UNIFORM_BELOW):
        return UNIFORM
    return INPUT_DEPENDENT if variation >= UNIFORM_BELOW else FIXED_MIX


@dataclass
class LayerStats:
    """Routing statistics of one dynamic layer over the images (see the module docstring)."""

    name: str
    kind: str
    experts: int
    per_channel: bool
    mean_routing: list[float]
    entropy: float
    top_share: list[float]
    spread: float | None
    spread_at_conversion: float | None
    margin: float = 0.0
    variation: float = 0.0
    top_weight: float = 0.0
    verdict: str = UNIFORM
    class_ratio: float | None = None
    class_means: list[list[float]] | None = None
    routing_block: str | None = None  # the block whose shared router this layer uses

    @property
    def moved(self) -> float | None:
        """``spread / spread_at_conversion``: 1 right after conversion, larger as the experts separate."""
        if self.spread is None or not self.spread_at_conversion:
            return None
        return self.spread / self.spread_at_conversion


@dataclass
class Analysis:
    """Routing statistics of every analysed layer, with what was analysed and how long it took."""

    checkpoint: str
    data: str
    images: int
    image_size: int
    classes: list[str]
    layers: list[LayerStats] = field(default_factory=list)
    seconds: float = 0.0

    def layer(self, name: str) -> LayerStats:
        """The statistics of the layer called ``name``."""
        return next(s for s in self.layers if s.name == name)

    def summary(self) -> str:
        """One line: data, speed, mean entropy, how many layers got each verdict, the most class-specific layer."""
        rate = self.images / self.seconds if self.seconds > 0 else float("nan")
        mean_entropy = sum(s.entropy for s in self.layers) / max(len(self.layers), 1)
        counts = ", ".join(
            f"{sum(s.verdict == v for s in self.layers)} {v.split(':')[0]}"
            for v in (UNIFORM, INPUT_DEPENDENT, FIXED_MIX, COLLAPSED, OFF)
        )
        text = (
            f"{self.images} images, {len(self.classes)} classes, {len(self.layers)} layers in {self.seconds:.1f} s "
            f"({rate:.0f} images/s): mean entropy {mean_entropy:.3f} (1 = uniform); layers: {counts}"
        )
        ratios = [s for s in self.layers if s.class_ratio is not None]
        if ratios:
            best = max(ratios, key=lambda s: s.class_ratio or 0.0)
            text += f"; most class-specific: {best.name} (ratio {best.class_ratio:.3g})"
        return text

    def to_json(self) -> dict[str, Any]:
        """Every number, as plain JSON types."""
        data = asdict(self)
        for entry, stats in zip(data["layers"], self.layers, strict=True):
            entry["moved"] = stats.moved
        data["summary"] = self.summary()
        return data

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` and return it."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


class _Accumulator:
    """Running sums for one layer's routing over batches (float64)."""

    def __init__(self, experts: int, classes: int) -> None:
        self.experts = experts
        self.classes = classes
        self.count = 0
        self.entropy = 0.0
        self.top = torch.zeros(experts, dtype=torch.float64)
        self.weights = torch.zeros(experts, dtype=torch.float64)
        self.squares = 0.0
        self.class_sum: Tensor | None = None
        self.class_count = torch.zeros(classes, dtype=torch.float64)
        self.margin = 0.0
        self.share_sum: Tensor | None = None  # sum over images of p, per expert (and output channel)
        self.share_squares: Tensor | None = None

    def add(self, routing: Tensor, labels: Tensor) -> None:
        r = routing.detach().to("cpu", torch.float64)  # [B, K] or [B, K, C]
        p = r / r.sum(1, keepdim=True).clamp_min(1e-300)
        k = self.experts
        if k > 1:  # clamped: rounding must not take a uniform routing past 1
            entropy = (-(p * p.clamp_min(1e-300).log()).sum(1) / math.log(k)).clamp(0.0, 1.0)
        else:
            entropy = torch.ones_like(p[:, 0])
        peak = p.amax(1, keepdim=True)
        ties = (p >= peak * (1 - TIE)).double()
        ties = ties / ties.sum(1, keepdim=True)
        margin = ((peak.squeeze(1) - 1 / k) / (1 - 1 / k)).clamp_min(0.0) if k > 1 else torch.zeros_like(peak[:, 0])
        if r.dim() == 3:  # per output channel: (sample, channel) pairs are the decisions
            entropy, ties, weights, margin = entropy.mean(-1), ties.mean(-1), r.mean(-1), margin.mean(-1)
        else:
            weights = r
        self.margin += float(margin.sum())
        shares = p.flatten(1)
        if self.share_sum is None:
            self.share_sum = torch.zeros(shares.shape[1], dtype=torch.float64)
            self.share_squares = torch.zeros(shares.shape[1], dtype=torch.float64)
        self.share_sum += shares.sum(0)
        self.share_squares += (shares * shares).sum(0)
        self.count += r.shape[0]
        self.entropy += float(entropy.sum())
        self.top += ties.sum(0)
        self.weights += weights.sum(0)
        vectors = r.flatten(1)
        self.squares += float((vectors * vectors).sum())
        if self.class_sum is None:
            self.class_sum = torch.zeros(self.classes, vectors.shape[1], dtype=torch.float64)
        self.class_sum.index_add_(0, labels, vectors)
        self.class_count += torch.bincount(labels, minlength=self.classes).double()

    def share_statistics(self) -> tuple[float, float, float]:
        """``(margin, variation, top_weight)`` of the decisions so far (see the module docstring)."""
        assert self.share_sum is not None and self.share_squares is not None
        mean = self.share_sum / self.count  # [K] or [K * C]
        variance = (self.share_squares / self.count - mean * mean).clamp_min(0.0)
        variation = float(variance.mean().sqrt()) * self.experts
        top_weight = float(mean.reshape(self.experts, -1).amax(0).mean())
        return self.margin / self.count, variation, top_weight

    def vector_moments(self) -> tuple[Tensor, float]:
        """``(mean routing vector, mean squared distance of a sample's vector from it)``, vectors flattened."""
        assert self.class_sum is not None
        mean = self.class_sum.sum(0) / self.count
        return mean, max(self.squares / self.count - float((mean * mean).sum()), 0.0)

    def class_statistics(self, per_channel: bool) -> tuple[float | None, list[list[float]]]:
        """``(between / within class variance ratio, mean weights per class [classes][K])``."""
        assert self.class_sum is not None
        present = self.class_count > 0
        n = self.class_count[present]
        means = self.class_sum[present] / n[:, None]
        overall = self.class_sum.sum(0) / self.count
        between = float((n * ((means - overall) ** 2).sum(1)).sum()) / self.count
        within = max(self.squares - float((n * (means * means).sum(1)).sum()), 0.0) / self.count
        ratio: float | None = 0.0 if between == 0 else (between / within if within > 0 else None)
        full = self.class_sum / self.class_count.clamp_min(1)[:, None]
        if per_channel:
            full = full.reshape(self.classes, self.experts, -1).mean(-1)
        return ratio, full.tolist()


def expert_spread(layer: nn.Module) -> float | None:
    """``sqrt(mean_k |W_k - W_mean|^2) / |W_mean|`` over the expert kernels, or ``None`` without a bank."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 5:
        return None
    w = weight.detach().to("cpu", torch.float64).flatten(1)
    mean = w.mean(0)
    norm = float(mean.norm())
    return math.sqrt(float(((w - mean) ** 2).sum()) / w.shape[0]) / norm if norm > 0 else None


def conversion_noise(model: nn.Module) -> float:
    """The relative expert noise the model was converted with (its recipe's, ``dynconv.experts.DEFAULT_NOISE`` else)."""
    recipe = getattr(getattr(model, CONVERSION_ATTR, None), "recipe", None) or {}
    for level in (recipe.get("overrides") or {}, recipe.get("defaults") or {}):
        if level.get("noise") is not None:
            return float(level["noise"])
    return DEFAULT_NOISE


def select_layers(model: nn.Module, patterns: list[str] | None) -> dict[str, nn.Module]:
    """The dynamic layers to analyse: all, or those matching ``patterns`` (names, globs or ``re:``)."""
    layers = {n: m for n, m in dynconv.dynamic_layers(model).items() if getattr(m, "has_experts", True)}
    if not layers:
        raise UserError("the model has no dynamic layer with experts, so there is no routing to analyse")
    if not patterns:
        return layers
    for pattern in patterns:
        if not any(name_matches(pattern, n) for n in layers):
            close = difflib.get_close_matches(pattern, list(layers), n=4, cutoff=0.4) or list(layers)[:4]
            raise UserError(f"layer {pattern!r} matches no dynamic layer of the model; close names: {', '.join(close)}")
    return {n: m for n, m in layers.items() if any(name_matches(p, n) for p in patterns)}


def analysis_dataset(
    data: Path, image_size: int | None, limit: int | None, preprocessing: Preprocessing | None = None
) -> tuple[Dataset, list[str]]:
    """The images to analyse (``val/`` of a train/val folder, else all) and the class names.

    Reads the folder as fine-tuning does (same resize and normalisation). ``limit`` takes
    that many images in a seeded random order, so every class stays represented.
    """
    _, held_out, _ = image_folder_splits(data, image_size, 0.0, 0, preprocessing=preprocessing, augment=False)
    folder = held_out.dataset if isinstance(held_out, Subset) else held_out  # a flat folder: all of it
    dataset: Dataset = folder
    if limit is not None and limit < len(folder):
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        dataset = Subset(folder, order.tolist())
    return dataset, list(folder.classes)


def analyze(
    checkpoint: str | Path,
    data: str | Path,
    *,
    layers: list[str] | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    image_size: int | None = None,
    model: nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Analysis:
    """Routing statistics of the converted checkpoint over the image folder ``data``.

    ``model`` is a base module for checkpoints of custom models (as :func:`convert.load_checkpoint`);
    ``progress(done, total)`` is called after every batch.
    """
    checkpoint, data = Path(checkpoint), Path(data)
    if not data.is_dir():
        raise UserError(f"image folder {data} does not exist")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"the image limit must be at least 1, got {limit}")
    net = load_checkpoint(checkpoint, model=model).eval()
    chosen = select_layers(net, layers)
    prep = checkpoint_preprocessing(checkpoint, net)
    size = image_size or prep.input_size[1]
    dataset, classes = analysis_dataset(data, size, limit, prep)
    loader = DataLoader(dataset, batch_size=batch_size)
    sums = {name: _Accumulator(layer.experts, len(classes)) for name, layer in chosen.items()}
    per_channel: dict[str, bool] = {}
    start, done, total = time.perf_counter(), 0, len(dataset)
    with torch.inference_mode():
        for images, labels in loader:
            with dynconv.capture_routing(net) as routing:
                net(images)
            for name in chosen.keys() & routing.keys():  # a layer this forward did not run adds nothing
                weights = chosen[name].expert_weights(routing[name])
                per_channel[name] = weights.dim() == 3
                sums[name].add(weights, labels)
            done += labels.numel()
            if progress is not None:
                progress(done, total)
    noise = conversion_noise(net)
    analysis = Analysis(str(checkpoint), str(data), done, size, classes, seconds=time.perf_counter() - start)
    for name, layer in chosen.items():
        acc = sums[name]
        if acc.count == 0:
            continue
        ratio, means = acc.class_statistics(per_channel[name]) if len(classes) > 1 else (None, None)
        share = layer._modules.get("routing_share")
        margin, variation, top_weight = acc.share_statistics()
        analysis.layers.append(
            LayerStats(
                name=name,
                kind=layer.kind,
                experts=layer.experts,
                per_channel=per_channel[name],
                mean_routing=(acc.weights / acc.count).tolist(),
                entropy=acc.entropy / acc.count,
                top_share=(acc.top / acc.count).tolist(),
                spread=expert_spread(layer),
                spread_at_conversion=noise * math.sqrt((layer.experts - 1) / layer.experts),
                margin=margin,
                variation=variation,
                top_weight=top_weight,
                verdict=verdict(margin, variation, top_weight, layer.experts),
                class_ratio=ratio,
                class_means=means,
                routing_block=None if share is None else share.block,
            )
        )
    return analysis
