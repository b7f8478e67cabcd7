"""Routing functions: from an input batch to per-sample expert weights.

Each router pools the input globally (``mean`` over H and W, which works for any
memory format and any batch size, so no BatchNorm and no ``.view`` on the input)
and maps the pooled features to routing weights. ``zero_()`` makes a router output
the same weights for every input, which is how a converted layer starts out
computing exactly what the original convolution did.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Router(nn.Module):
    """The contract every router keeps, so a layer built from a trained conv starts exact.

    - ``forward(x)`` maps an input batch to routing weights;
    - ``zero_()`` makes those weights the same for every input (and returns the router);
    - ``uniform_total()`` is the sum of the weights over the experts once zeroed, so
      ``from_conv`` can scale the experts by its inverse;
    - ``sums_to_one`` says whether every input's weights sum to one (softmax), which
      decides where a folded BatchNorm's shift can go.
    """

    sums_to_one: ClassVar[bool] = True

    def zero_(self) -> Router:
        raise NotImplementedError

    def uniform_total(self) -> float:
        raise NotImplementedError

    def calibration_head(self) -> RoutingHead | None:
        """Where the expert logits come from, for :func:`dynconv.calibrate_routing`; ``None``: no such routing."""
        return None

    def zeroed_parameters(self) -> list[Tensor]:
        """The parameters (or rows of them) ``zero_()`` sets to zero: all zero means the router is untrained.
        Default: the calibration head's weight and bias."""
        found = self.calibration_head()
        return [] if found is None else [p for p in (found.weight, found.bias) if p is not None]


class RoutingHead(NamedTuple):
    """A router's expert logits: the ``weight`` and ``bias`` rows (views) of the linear layer ``module`` that computes
    them from its input, and their normalisation, ``"softmax"`` or ``"pairs"`` (CondConv's sigmoid experts in pairs)."""

    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    style: str

    @classmethod
    def of(cls, linear: nn.Linear, style: str) -> RoutingHead:
        """Every output of ``linear`` is a logit."""
        return cls(linear, linear.weight, linear.bias, style)


class SplitLinear(nn.Linear):
    """Several linear heads on the same features as one layer: their weight rows stacked in one parameter.

    ``sizes`` names the heads in order (a head of size 0 is left out); ``sigmoid`` names those
    whose output goes through a sigmoid. Consecutive heads with the same activation are computed
    as one product and one activation, then split: ODConv 1x's three sigmoid attentions are one
    GEMM and one sigmoid, which ONNX Runtime fuses into one ``FusedGemm``. (A single product for
    every head, split before the activations, measured slower there: it breaks that fusion and
    adds a Split and a Sigmoid per head; ``benchmarks/results/router_gemm.md``.) :meth:`rows`
    gives a head's weight and bias as views; the layer initialises as separate ``nn.Linear``
    heads would (same fan-in).
    """

    def __init__(self, in_features: int, sizes: dict[str, int], sigmoid: tuple[str, ...] = ()) -> None:
        self.sizes = {name: size for name, size in sizes.items() if size}
        self.sigmoid = tuple(name for name in self.sizes if name in sigmoid)
        super().__init__(in_features, sum(self.sizes.values()))
        #: ``(start, stop, names, sigmoid)`` per run of consecutive heads with the same activation.
        self.segments: list[tuple[int, int, list[str], bool]] = []
        start = 0
        for name, size in self.sizes.items():
            squashed = name in self.sigmoid
            if self.segments and self.segments[-1][3] == squashed:
                first, _, names, _ = self.segments[-1]
                self.segments[-1] = (first, start + size, [*names, name], squashed)
            else:
                self.segments.append((start, start + size, [name], squashed))
            start += size

    def __contains__(self, name: str) -> bool:
        return name in self.sizes

    def rows(self, name: str) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` of head ``name``: views of this layer's parameters."""
        names = list(self.sizes)
        start = sum(self.sizes[other] for other in names[: names.index(name)])
        stop = start + self.sizes[name]
        return self.weight[start:stop], self.bias[start:stop]

    def forward(self, x: Tensor, divisor: Tensor | None = None) -> dict[str, Tensor]:  # type: ignore[override]
        """Each head's output by name (after its sigmoid, if it has one); ``divisor`` (a temperature) divides
        the logits. It divides the weights, so an exported graph folds it into the constant weights."""
        out: dict[str, Tensor] = {}
        for start, stop, names, squashed in self.segments:
            weight, bias = self.weight[start:stop], self.bias[start:stop]
            if divisor is not None:
                weight, bias = weight / divisor, bias / divisor
            product = F.linear(x, weight, bias)
            if squashed:
                product = torch.sigmoid(product)
            if len(names) == 1:
                out[names[0]] = product
                continue
            parts = product.split([self.sizes[name] for name in names], dim=1)
            out.update({name: parts[i] for i, name in enumerate(names)})
        return out


def stack_legacy_heads(module: nn.Module, attr: str, legacy: dict[str, str]) -> None:
    """Let ``module`` load state written when its ``SplitLinear`` ``attr`` was one ``nn.Linear`` per head.

    ``legacy`` maps each head's name to the submodule that held it (checkpoint format 2): such
    weights and biases are stacked into ``attr`` on load, so old checkpoints and state dicts load.
    """

    def hook(owner: nn.Module, state: dict[str, Tensor], prefix: str, *_args: object) -> None:
        heads: SplitLinear = getattr(owner, attr)  # the module loading (a deep copy gets its own, not ``module``)
        for part in ("weight", "bias"):
            old = [f"{prefix}{legacy[name]}.{part}" for name in heads.sizes]
            if f"{prefix}{attr}.{part}" not in state and all(key in state for key in old):
                state[f"{prefix}{attr}.{part}"] = torch.cat([state.pop(key) for key in old])

    module._register_load_state_dict_pre_hook(hook, with_module=True)  # the hook gets the module that loads


def global_pool(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, C]`` average, memory-format agnostic."""
    return x.mean(dim=(2, 3))


class SigmoidRouter(Router):
    """CondConv routing: ``sigmoid(linear(dropout(GAP(x))))``, one weight per expert in (0, 1).

    Dropout acts on the pooled features that feed the router (CondConv's routing
    dropout); with a zeroed router it cannot change the output, so a freshly
    converted model computes the same function in train mode too.
    """

    sums_to_one = False  # K/2 when zeroed

    def __init__(self, in_channels: int, experts: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"routing dropout must be in [0, 1), got {dropout}")
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, experts)

    #: Sum of the routing weights when the router is zeroed: sigmoid(0) = 1/2 per expert.
    def uniform_total(self) -> float:
        return 0.5 * self.fc.out_features

    def calibration_head(self) -> RoutingHead:
        return RoutingHead.of(self.fc, "pairs")

    def zero_(self) -> SigmoidRouter:
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.fc(self.dropout(global_pool(x))))


class SoftmaxRouter(Router):
    """DyConv attention: ``softmax(fc2(relu(fc1(GAP(x)))) / T)`` over the experts.

    ``fc1`` reduces the channels by ``reduction`` (at least ``min_hidden`` wide).
    The temperature is a buffer, so annealing it never recompiles a compiled model
    and a saved model keeps the value it was trained with.
    """

    sums_to_one = True

    def __init__(
        self,
        in_channels: int,
        experts: int,
        reduction: int = 4,
        min_hidden: int = 16,
        temperature: float = 30.0,
    ) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        hidden = max(in_channels // reduction, min_hidden)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, experts)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def uniform_total(self) -> float:
        return 1.0

    def calibration_head(self) -> RoutingHead:
        return RoutingHead.of(self.fc2, "softmax")

    def zero_(self) -> SoftmaxRouter:
        """Zero the output layer only: ``fc1`` keeps random features so ``fc2`` gets gradients."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        return self

    def forward(self, x: Tensor) -> Tensor:
        logits = self.fc2(F.relu(self.fc1(global_pool(x))))
        return torch.softmax(logits / self.temperature.to(logits.dtype), dim=1)


class ChannelRouter(Router):
    """DyNet coefficients: ``linear(GAP(x))`` as ``[B, K, C_out]``, softmax over the experts.

    With ``reduction`` the linear map gets a bottleneck in front (``linear -> ReLU``,
    ``max(C_in // reduction, min_hidden)`` wide), so the router no longer grows as
    ``C_in x K x C_out``.
    """

    sums_to_one = True

    def __init__(
        self, in_channels: int, out_channels: int, experts: int, reduction: int | None = None, min_hidden: int = 16
    ) -> None:
        super().__init__()
        self.experts = experts
        self.out_channels = out_channels
        if reduction is None:
            self.hidden: nn.Module = nn.Identity()
            width = in_channels
        else:
            if reduction < 1:
                raise ValueError(f"reduction must be >= 1, got {reduction}")
            width = max(in_channels // reduction, min_hidden)
            self.hidden = nn.Sequential(nn.Linear(in_channels, width), nn.ReLU())
        self.fc = nn.Linear(width, experts * out_channels)

    def uniform_total(self) -> float:
        return 1.0

    def calibration_head(self) -> RoutingHead:
        return RoutingHead.of(self.fc, "softmax")

    def zero_(self) -> ChannelRouter:
        """Zero the output layer only: a bottleneck keeps random features so ``fc`` gets gradients."""
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        return self

    def forward(self, x: Tensor) -> Tensor:
        logits = self.fc(self.hidden(global_pool(x))).reshape(-1, self.experts, self.out_channels)  # batch symbolic
        return torch.softmax(logits, dim=1)
