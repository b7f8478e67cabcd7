"""What every dynamic convolution shares: ``nn.Conv2d``'s arguments, experts, the core call.

A subclass says how it routes (``_build_router``, whose keyword parameters are the
kind's options, see :mod:`dynconv.layers.spec`) and describes itself (``info``).
Kinds whose kernel is not a routed mixture of ``K`` experts override ``forward``,
``from_conv``, ``fold_affine_`` and the parameter roles. Attributes mirror
``nn.Conv2d`` (``in_channels``, ``kernel_size``, ``padding_mode`` ...) so code that
inspects convolutions keeps working; ``weight`` is ``[K, C_out, C_in/groups, kH, kW]``
and ``bias`` is ``[K, C_out]``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.kernels import add_bias, mix_bias
from ..experts import DEFAULT_EXPERTS, DEFAULT_NOISE, upcycle
from ..functional import STRATEGIES, dynamic_conv2d
from ..geometry import ConvGeometry, IntPair, Padding, as_pair, tf_same_padding
from ..routing import Router
from ..standardization import WeightStandardization, standardized_routing
from ..step_matching import matched_multiplier
from .spec import KindInfo, OptionSpec, option_specs

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
#: TensorFlow's 'SAME' (timm ``Conv2dSame``): padding computed from each input's size.
TF_SAME = "tf_same"


def pad_by_hand(
    x: Tensor,
    tf_same: bool,
    pad: tuple[int, int, int, int],
    mode: str,
    kernel: IntPair,
    stride: IntPair,
    dilation: IntPair,
) -> Tensor:
    """Pad where ``F.conv2d`` cannot: TF 'same' (from the input's size) or a non-zero ``padding_mode``."""
    if tf_same:
        pad = tf_same_padding(x.shape[-2:], kernel, stride, dilation)
    return F.pad(x, pad, mode="constant" if mode == "zeros" else mode)


# torch.fx (torchvision's create_feature_extractor, BatchNorm folding) records these as
# leaf calls: they branch on shapes, which a symbolic trace cannot, and pick the strategy
# when the traced graph runs, for the batch it gets.
for _leaf in ("dynamic_conv2d", "standardized_routing", "mix_bias", "add_bias", "pad_by_hand"):
    torch.fx.wrap(_leaf)


class DynamicConv2d(nn.Module):
    """Base class: a ``Conv2d`` whose kernel is mixed per sample from ``experts`` kernels."""

    kind: ClassVar[str] = ""
    #: Plain-text description for ``dynconv kinds``.
    info: ClassVar[KindInfo]
    #: Whether the kind has a bank of ``experts`` kernels (``experts`` is one of its options).
    has_experts: ClassVar[bool] = True
    #: Why this kind cannot use a routing computed by another conv of its block (:mod:`dynconv.shared_routing`), or
    #: ``None``: its experts are mixed with one weight per expert and sample (``[B, K]``), which such a conv can use.
    #: A kind whose ``forward`` does not get its routing from :meth:`route` must say why here.
    routing_unshareable: ClassVar[str | None] = None
    #: This layer's place in its block's shared routing; set with ``routing_share`` by
    #: :func:`dynconv.shared_routing.share_routing` (0: it computes the routing, or it shares none).
    routing_position: int = 0
    #: ``(start, end)`` of the router temperature annealed during fine-tuning, or ``None``: keep it.
    temperature_annealing: ClassVar[tuple[float, float] | None] = None
    #: The routers' learning-rate multiplier per optimizer family in :func:`dynconv.parameter_groups`: under SGD a
    #: softmax router's gradient is proportional to the conversion's noise, so it gets 30x (on Fashion-MNIST that
    #: moved the routing and tied static; benchmarks/results/pays.md); Adam-type steps do not scale with the gradient,
    #: and 10x or 30x there was no better on validation. CondConv declares its own.
    router_lr_multipliers: ClassVar[dict[str, float]] = {"sgd": 30.0, "adam": 1.0, "trust": 1.0}
    #: Whether ``dynconv finetune`` calibrates this kind's fresh routers by default (:mod:`dynconv.calibration`),
    #: as its benchmark chose on validation. A kind that anneals its temperature must not: calibration fixes it at 1.
    calibrates_by_default: ClassVar[bool] = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        experts: int = DEFAULT_EXPERTS,
        standardize: WeightStandardization | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **router_options: Any,
    ) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if not isinstance(experts, int) or experts < 1:
            raise ValueError(f"experts must be a positive int, got {experts!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.padding = padding if isinstance(padding, str) else as_pair(padding, "padding")
        self.dilation = as_pair(dilation, "dilation")
        self.groups = groups
        self.padding_mode = padding_mode
        self.experts = experts
        # Validates padding/stride combinations ('same' with stride > 1) once, up front.
        static_padding = 0 if padding == TF_SAME else self.padding
        self._geometry = ConvGeometry.build(self.kernel_size, self.stride, static_padding, self.dilation, groups)
        self.standardize = standardize
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(experts, out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(experts, out_channels, **factory)) if bias else None
        self.gain = (
            nn.Parameter(torch.ones(out_channels, **factory))
            if standardize is not None and standardize.learnable_gain
            else None
        )
        bound = inspect.signature(self._build_router).bind(**router_options)
        bound.apply_defaults()
        for spec in self.option_specs().values():
            if spec.bounds is not None and bound.arguments[spec.name] is not None:
                spec.bounds.check(spec.name, bound.arguments[spec.name])
        #: The router options in force, defaults included (recorded in checkpoints).
        self.router_options: dict[str, Any] = dict(bound.arguments)
        self.router: Router = self._build_router(**router_options).to(**factory)
        #: ``[C_out]`` added after the mixed convolution; only a folded BatchNorm's shift
        #: under routing that does not sum to one needs it (see :mod:`dynconv.folding`).
        self.static_bias: nn.Parameter | None = None
        self._strategy: str | None = None
        #: When True, ``last_routing`` keeps a detached copy of the latest routing weights.
        self.capture_routing = False
        self.last_routing: Tensor | None = None
        self.reset_parameters()

    def _build_router(self, **options: Any) -> Router:
        raise NotImplementedError

    @classmethod
    def option_specs(cls) -> dict[str, OptionSpec]:
        """This kind's options (beyond ``nn.Conv2d``'s and ``experts``): name, type, default, range."""
        return option_specs(cls._build_router)

    @classmethod
    def unsupported(cls, options: dict[str, Any]) -> str | None:
        """Why this kind cannot reproduce a conv that needs these ``from_conv`` options, or ``None``.

        ``options`` are the conv-class options the converter would pass (``padding``,
        ``standardize``); a converter leaves such a conv static with this reason.
        """
        return None

    @classmethod
    def router_option_names(cls) -> tuple[str, ...]:
        """The router options this kind accepts (``dropout``, ``temperature`` ...)."""
        return tuple(cls.option_specs())

    def router_parameters(self) -> list[nn.Parameter]:
        """Parameters that compute the routing (trained from zero after conversion)."""
        return list(self.router.parameters())

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters that hold the kernels: the experts, their bias, a standardisation gain."""
        return [p for p in (self.weight, self.bias, self.gain, self.static_bias) if p is not None]

    def expert_weights(self, routing: Tensor) -> Tensor:
        """The part of a captured ``last_routing`` that mixes the experts: ``[B, K]`` or ``[B, K, C_out]``."""
        return routing

    def lr_multipliers(self, family: str) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (``"router"`` for every router parameter) under an optimizer
        ``family`` (``sgd``, ``adam``, ``trust``), so a step on the freshly converted layer moves its kernel as a step
        on the original conv moves the conv's.

        Each expert is mixed with weight ``uniform_total / K`` and stored ``1 / uniform_total`` x the kernel
        (see :meth:`from_conv`); a kind that parametrises its kernel otherwise overrides this.
        """
        total = self.router.uniform_total()
        experts = matched_multiplier(family, [total / self.experts] * self.experts, scale=1.0 / total)
        return {
            "weight": experts,
            "bias": experts,
            "gain": 1.0,
            "static_bias": 1.0,
            "router": self.router_lr_multipliers[family],
        }

    def fold_affine_(self, scale: Tensor, shift: Tensor) -> str:
        """Make the layer compute ``scale * layer(x) + shift`` per output channel (float64 inputs), in place.

        Scaling every expert's kernel and bias scales the mixed kernel whatever the
        routing. The shift goes into the experts' biases when every input's routing
        weights sum to one (softmax kinds); otherwise into ``static_bias``. Returns
        where the shift went: ``"bias"`` or ``"static_bias"``.
        """
        if self.standardize is not None:
            raise ValueError("a weight-standardised layer renormalises its kernel, which would undo a folded scale")
        weight = self.weight.detach()
        with torch.no_grad():
            self.weight.copy_((weight.double() * scale.view(1, -1, 1, 1, 1)).to(weight.dtype))
            bias = None if self.bias is None else self.bias.detach().double() * scale
            static = None if self.static_bias is None else self.static_bias.detach().double() * scale
            if self.router.sums_to_one:  # sum_k r_k (b_k + c) = sum_k r_k b_k + c for every input
                bias = shift.expand(self.experts, -1) if bias is None else bias + shift
                where = "bias"
            else:
                static = shift if static is None else static + shift
                where = "static_bias"
            factory = {"dtype": weight.dtype, "device": weight.device}
            if bias is not None and self.bias is None:
                self.bias = nn.Parameter(bias.to(**factory).contiguous())
            elif bias is not None:
                self.bias.copy_(bias)
            if static is not None:
                self.static_bias = nn.Parameter(static.to(**factory))
        return where

    def reset_parameters(self) -> None:
        """Independent ``nn.Conv2d``-style initialisation of every expert (training from scratch)."""
        for k in range(self.experts):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel() // self.out_channels
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        experts: int = DEFAULT_EXPERTS,
        *,
        noise: float = DEFAULT_NOISE,
        seed: int = 0,
        padding: Padding | None = None,
        standardize: WeightStandardization | None = None,
        **router_options: Any,
    ) -> DynamicConv2d:
        """Build a layer that computes exactly what ``conv`` computes, now, for any input.

        The router starts zeroed, so its weights are the same for every input
        (uniform); the experts are ``scale * (W + eps_k)`` with zero-sum noise, and
        ``scale = 1 / (sum of the uniform routing weights)``: 1 for the softmax kinds,
        ``2 / K`` for CondConv's sigmoid, whose zeroed router gives 1/2 per expert.
        The mixed kernel is then exactly ``W`` while the experts differ, so training
        separates them from the original model's accuracy rather than from scratch.

        ``padding`` overrides ``conv.padding`` (``"tf_same"`` for timm's ``Conv2dSame``);
        ``standardize`` keeps a weight-standardised conv's standardisation (a ``gain``
        attribute of ``conv`` is copied when the standardisation learns one).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        with torch.random.fork_rng(devices=[]):  # seeded router init, global RNG untouched
            torch.manual_seed(seed)
            layer = cls(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding if padding is None else padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
                padding_mode=conv.padding_mode,
                experts=experts,
                standardize=standardize,
                device=conv.weight.device,
                dtype=conv.weight.dtype,
                **router_options,
            )
        layer.router.zero_()
        scale = 1.0 / layer.router.uniform_total()
        weight, bias = upcycle(conv.weight, conv.bias, experts, scale=scale, noise=noise, seed=seed)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
            if layer.gain is not None and getattr(conv, "gain", None) is not None:
                layer.gain.copy_(conv.gain.detach().reshape(-1))
        layer.train(conv.training)
        return layer

    def _apply(self, fn: Any, recurse: bool = True) -> DynamicConv2d:
        """Let ``model.to(memory_format=torch.channels_last)`` pass over the 5-D expert bank.

        ``Module.to`` asks every 4-D and 5-D tensor for the memory format, and a 5-D
        tensor cannot be channels_last. The bank is converted as its 4-D view (so device
        and dtype still apply) and kept contiguous: the core mixes it as a matrix anyway.
        """

        def convert(t: Tensor) -> Tensor:
            if t.dim() != 5:
                return fn(t)
            try:
                return fn(t)
            except RuntimeError as exc:
                if "channels_last" not in str(exc):
                    raise
                return fn(t.flatten(0, 1)).reshape(t.shape).contiguous()

        return super()._apply(convert, recurse)

    def route(self, x: Tensor) -> Tensor:
        """Routing weights for ``x``: ``[B, K]``, or ``[B, K, C_out]`` per output channel.

        A layer whose block shares one router (:mod:`dynconv.shared_routing`) gets them
        from the block's ``routing_share``.
        """
        share = self._modules.get("routing_share")
        if share is not None:
            return share.route(self.router, x, self.routing_position)
        return self.router(x)

    def _pad_input(self, x: Tensor) -> tuple[Tensor, Padding]:
        """Pad by hand where ``F.conv2d`` cannot: non-zero ``padding_mode`` or TF 'same'."""
        tf_same = self.padding == TF_SAME
        if not tf_same and self.padding_mode == "zeros":
            return x, self.padding
        pad = (0, 0, 0, 0) if tf_same else self._geometry.pad
        return pad_by_hand(x, tf_same, pad, self.padding_mode, self.kernel_size, self.stride, self.dilation), 0

    def forward(self, x: Tensor) -> Tensor:
        routing = self.route(x)
        if self.capture_routing:
            self.last_routing = routing.detach()
        x, padding = self._pad_input(x)
        conv_args = (self.stride, padding, self.dilation, self.groups)
        if self.standardize is None:
            out = dynamic_conv2d(x, self.weight, routing, self.bias, *conv_args, strategy=self.strategy)
        else:
            weight, std_routing = standardized_routing(
                self.weight, routing, self.standardize.eps, self.standardize.scale, self.gain
            )
            out = dynamic_conv2d(x, weight, std_routing, None, *conv_args, strategy=self.strategy)
            out = add_bias(out, mix_bias(self.bias, routing))
        if self.static_bias is not None:
            out = out + self.static_bias.to(out.dtype)[:, None, None]
        return out

    def layer_options(self) -> dict[str, Any]:
        """Everything beyond ``nn.Conv2d``'s arguments needed to rebuild this layer (JSON-able)."""
        options: dict[str, Any] = {"experts": self.experts, **self.router_options}
        if self.padding == TF_SAME:
            options["padding"] = TF_SAME
        if self.standardize is not None:
            options["standardize"] = self.standardize.to_dict()
        return options

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
            f", experts={self.experts}"
        )
        if self.padding != (0, 0):
            text += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        if self.standardize is not None:
            text += f", standardize={self.standardize}"
        if self.static_bias is not None:
            text += ", static_bias=True"
        if self.strategy is not None:
            text += f", strategy={self.strategy!r}"
        return text

    @property
    def strategy(self) -> str | None:
        """The core strategy this layer forces, or ``None`` to choose per call by shape."""
        return self._strategy

    @strategy.setter
    def strategy(self, value: str | None) -> None:
        if value is not None and value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; choose from {sorted(STRATEGIES)}")
        self._strategy = value
