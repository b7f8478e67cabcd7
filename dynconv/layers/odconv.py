"""ODConv, omni-dimensional dynamic convolution (Li, Zhou, Yao, ICLR 2022): attention over four dimensions.

``W(x) = sum_i a_w,i(x) * a_f(x) (.) a_c(x) (.) a_s(x) (.) W_i``: a kernel attention over the
``n`` experts (softmax), an output-channel attention (sigmoid), an input-channel
attention (sigmoid) and a spatial attention over the kernel taps (sigmoid), all from
one small router. The attentions over output channels, input channels and taps are
per-sample factors of the kernel that the shared core multiplies into each sample's
kernel (its ``modulation``), so every strategy the core has (except output mixing)
computes it. Where it is cheaper, the channel attentions scale the input and output
maps instead and the kernel keeps only what is really per sample in it (the expert
mix and the taps); a kernel with nothing per sample left runs as one static conv.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.forms import Form, register_form
from ..core.kernels import im2col, mix_bias, plain_conv, pointwise_conv
from ..core.rules import odconv_path
from ..core.scope import note_strategy
from ..experts import DEFAULT_EXPERTS, DEFAULT_NOISE
from ..functional import dynamic_conv2d
from ..geometry import ConvGeometry, Padding
from ..routing import Router, RoutingHead, SplitLinear, global_pool, stack_legacy_heads
from ..standardization import WeightStandardization, standardized_bank, standardized_upcycle
from ..step_matching import matched_multiplier
from .base import TF_SAME, DynamicConv2d
from .registry import register
from .spec import Bounds, KindInfo

# ODConv's own forms: computed here, recorded (and exported) under these names.
RESCALED = register_form(
    Form("rescaled", None, per_sample_kernels=False, batch_agnostic=True, takes_terms=False, kind="odconv")
)
STATIC = register_form(
    Form(
        "static",
        None,
        per_sample_kernels=False,
        batch_agnostic=True,
        pointwise_only=True,
        takes_terms=False,
        kind="odconv",
    )
)


def attend_output(out: Tensor, filt: Tensor | None, bias: Tensor | None) -> Tensor:
    """``a_f * out + bias`` on a ``[B, C_out, H, W]`` output, in one pass when both are present."""
    if filt is not None and bias is not None:
        return torch.addcmul(bias[:, :, None, None].to(out.dtype), out, filt[:, :, None, None].to(out.dtype))
    if filt is not None:
        return out * filt[:, :, None, None].to(out.dtype)
    if bias is not None:
        return out + bias[:, :, None, None].to(out.dtype)
    return out


def rescaled_im2col(
    x: Tensor,
    weight: Tensor,
    channel: Tensor,
    spatial: Tensor,
    filt: Tensor | None,
    bias: Tensor | None,
    geom: ConvGeometry,
) -> Tensor:
    """ODConv 1x without per-sample kernels: ``a_f * (W @ (im2col(x) * (a_c x a_s))) + bias``.

    With one expert the attentions over input channels and taps scale the im2col
    columns and the one over output channels scales the result, so the kernel stays
    static and every sample shares one GEMM (``groups == 1``; ``x`` unpadded; ``bias``
    per sample, ``[B, C_out]``).
    """
    x = F.pad(x, geom.pad) if any(geom.pad) else x
    left, right, top, bottom = geom.pad
    h_out, w_out = geom.output_size(x.shape[-2] - top - bottom, x.shape[-1] - left - right)
    cols = im2col(x, geom)  # [B, C_in * kk, L]
    scale = (channel.unsqueeze(2) * spatial.unsqueeze(1)).reshape(channel.shape[0], -1, 1)
    out = torch.matmul(weight.reshape(weight.shape[1], -1), cols * scale.to(cols.dtype))  # [B, C_out, L]
    return attend_output(out.reshape(out.shape[0], out.shape[1], h_out, w_out), filt, bias)


def kernel_factors(
    filt: Tensor | None, channel: Tensor, spatial: Tensor | None, weight: Tensor, groups: int
) -> tuple[Tensor, ...]:
    """The attentions as per-sample kernel factors for the core: (output x input channels, taps)."""
    c_out, per_group = weight.shape[1], weight.shape[2]
    if groups == 1:
        factor = channel.reshape(-1, 1, per_group, 1, 1)
    else:  # output o of group g reads input channels g * C_in/g ...: expand over the group's outputs
        factor = channel.reshape(-1, groups, 1, per_group).expand(-1, -1, c_out // groups, -1)
        factor = factor.reshape(-1, c_out, per_group, 1, 1)
    if filt is not None:
        factor = factor * filt.reshape(-1, c_out, 1, 1, 1)
    if spatial is None:
        return (factor,)
    return (factor, spatial.reshape(-1, 1, 1, weight.shape[3], weight.shape[4]))


def omni_conv2d(
    x: Tensor,
    weight: Tensor,
    attentions: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    bias: Tensor | None,
    geom: ConvGeometry,
    padding: Padding,
    strategy: str | None,
) -> Tensor:
    """The ODConv convolution, the cheapest exact way for the shape (``strategy=None``).

    ODConv 1x on small maps (where the im2col columns are fewer than the kernel's
    weights): a rescaled im2col with the static kernel. Where the maps are cheaper to
    scale than the kernel (:func:`dynconv.core.rules.odconv_path`): the input scaled by ``a_c``, the
    core with only the kernel and spatial attentions (none left: a static conv), the
    output scaled by ``a_f``. Otherwise, and for a forced ``strategy``, the shared core
    with every attention as a kernel factor.
    """
    kernel, filt, channel, spatial = attentions
    path = odconv_path(x.shape, weight.shape, geom, spatial is not None, strategy)
    if path == "rescaled":
        note_strategy(RESCALED.name)
        return rescaled_im2col(x, weight, channel, spatial, filt, mix_bias(bias, kernel), geom)
    conv_args = (geom.stride, padding, geom.dilation, geom.groups)
    if path == "maps":
        x = x * channel[:, :, None, None].to(x.dtype)
        if weight.shape[0] == 1 and spatial is None:  # a 1x1 kernel shared by the batch
            note_strategy(STATIC.name)
            if torch.compiler.is_exporting():  # a Conv with a constant weight, which a runtime pre-packs
                out = plain_conv(x, weight[0], None, geom, geom.groups)
            else:
                out = pointwise_conv(x, weight[0].flatten(1), None, geom)
        else:
            taps = () if spatial is None else (spatial.reshape(-1, 1, 1, weight.shape[3], weight.shape[4]),)
            out = dynamic_conv2d(x, weight, kernel, None, *conv_args, modulation=taps)
        return attend_output(out, filt, mix_bias(bias, kernel))
    factors = kernel_factors(filt, channel, spatial, weight, geom.groups)
    return dynamic_conv2d(x, weight, kernel, bias, *conv_args, strategy=strategy, modulation=factors)


torch.fx.wrap("omni_conv2d")  # a leaf call for torch.fx: it branches on shapes


class OmniRouter(Router):
    """GAP -> linear -> ReLU -> up to four heads in one linear layer, each divided by the temperature; no BatchNorm.

    Heads (``head``, a :class:`~dynconv.routing.SplitLinear`: one GEMM and one sigmoid for the
    three sigmoid attentions, one GEMM for the kernel attention's logits):
    ``channel`` (``C_in``, sigmoid) always; ``filter`` (``C_out``, sigmoid) unless the conv is
    depthwise; ``spatial`` (``kH * kW``, sigmoid) unless the kernel is 1x1; ``kernel`` (``n``,
    softmax) unless there is one expert. Zeroed heads give 1/2 per sigmoid and 1/n per expert
    for every input, so :meth:`uniform_total` is ``2 ** -(number of sigmoid heads)``: the
    experts are scaled by its inverse. Checkpoints of format 2 kept one ``nn.Linear`` per head
    (``router.channel``, ...); they load into ``head``.
    """

    sums_to_one = True  # the kernel attention (the only routing that mixes experts and bias) is a softmax

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        taps: int,
        experts: int,
        depthwise: bool,
        hidden: int,
        temperature: float,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.fc = nn.Linear(in_channels, hidden)
        sizes = {
            "channel": in_channels,
            "filter": 0 if depthwise else out_channels,
            "spatial": 0 if taps == 1 else taps,
            "kernel": 0 if experts == 1 else experts,
        }
        self.head = SplitLinear(hidden, sizes, sigmoid=("channel", "filter", "spatial"))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        stack_legacy_heads(self, "head", {name: name for name in self.head.sizes})  # format 2: router.<name>

    def sigmoid_heads(self) -> int:
        """How many sigmoid attentions scale the kernel (each gives 1/2 when zeroed)."""
        return len(self.head.sigmoid)

    def uniform_total(self) -> float:
        return 0.5 ** self.sigmoid_heads()

    def calibration_head(self) -> RoutingHead | None:
        """The kernel attention (a softmax over the experts); the sigmoid attentions stay at 1/2."""
        return RoutingHead(self.head, *self.head.rows("kernel"), "softmax") if "kernel" in self.head else None

    def zeroed_parameters(self) -> list[Tensor]:
        """Every head's weight and bias (the sigmoid attentions too)."""
        return [self.head.weight, self.head.bias]

    def zero_(self) -> OmniRouter:
        """Zero every head; ``fc`` keeps random features so the heads get gradients at once."""
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``(kernel [B, n], filter [B, C_out] or None, channel [B, C_in], spatial [B, kH*kW] or None)``."""
        hidden = F.relu(self.fc(global_pool(x)))
        heads = self.head(hidden, divisor=self.temperature.to(hidden.dtype))  # sigmoid((W h + b) / t), kernel: logits
        channel, filt, spatial = heads["channel"], heads.get("filter"), heads.get("spatial")
        if "kernel" in heads:
            kernel = torch.softmax(heads["kernel"], dim=1)
        else:
            kernel = torch.ones_like(channel[:, :1])
        return kernel, filt, channel, spatial


@register
class ODConv2d(DynamicConv2d):
    """``W(x) = sum_i a_w,i * a_f (.) a_c (.) a_s (.) W_i`` (ODConv); ``experts`` is ``n`` (1: "ODConv 1x").

    Router options: ``reduction`` (16) and ``min_hidden`` (16) give the hidden width
    ``max(C_in / reduction, min_hidden)``; ``temperature`` (1, the reference's; divides
    every head's logits, annealed like DyConv's by ``dynconv finetune``).

    Exact at conversion: the heads start at zero, so every sigmoid attention is 1/2 and
    the kernel attention 1/n for every input. The experts therefore start as
    ``2**m * (W + eps_i)`` with zero-sum ``eps_i`` and ``m`` the number of sigmoid heads:
    3 (``8 * (W + eps_i)``) for a dense k x k conv, 2 for a 1x1 conv or a depthwise one, 1
    for a depthwise 1x1. Copying a trained ``W`` into the reference implementation
    without that factor gives ``1/2**m`` of the output. The bias is not attended: it is
    mixed by the kernel attention only, so it starts as the conv's bias, unscaled.
    """

    kind = "odconv"
    routing_unshareable = "computes its kernel its own way, not as one routing vector over its experts"
    info = KindInfo(
        title="ODConv: omni-dimensional dynamic convolution (Li, Zhou, Yao, ICLR 2022)",
        formula="W(x) = sum_i a_w,i(x) a_f(x) a_c(x) a_s(x) W_i: kernel (softmax over n), output-channel, "
        "input-channel and spatial (k x k taps) attentions",
        routing="global average pool -> linear (C_in -> max(C_in/16, 16)) -> ReLU -> heads / temperature: "
        "sigmoid over C_in, C_out (not depthwise), k x k taps (not 1x1); softmax over the n experts "
        "(n > 1); no BatchNorm",
        parameters="n x the conv's kernel, plus C_in x h + h x (C_in + C_out + k^2 + n) for the attention "
        "(h = max(C_in/16, 16))",
        speed="channel attentions scale the input and output maps where those are smaller than the kernel (a "
        "1x1 ODConv 1x there: one matmul shared by the batch); otherwise one per-sample kernel through the "
        "shared core: static conv cost at batch 1, 1x1 convs as a batched matmul, k x k convs folded into conv "
        "groups; ODConv 1x on maps up to 8x8: rescaled im2col and one static GEMM",
    )

    def __init__(self, *args: Any, standardize: WeightStandardization | None = None, **kwargs: Any) -> None:
        super().__init__(*args, standardize=standardize, **kwargs)
        #: The geometry of the conv on an input already padded by hand (TF 'same', padding modes).
        self._padded_geometry = replace(self._geometry, pad=(0, 0, 0, 0))
        #: A standardised conv (timm ``StdConv2d``): each expert is standardised, then modulated.
        #: Standardisation is scale-invariant, so the conversion's scale cannot ride in the experts;
        #: this per-output-channel factor holds it (``2**m``, see the class docstring, times
        #: :func:`~dynconv.standardization.standardized_upcycle`'s noise correction).
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        scale = None if standardize is None else torch.full((self.out_channels,), standardize.scale, **factory)
        self.standardized_scale: Tensor | None
        self.register_buffer("standardized_scale", scale)

    def _build_router(
        self,
        reduction: Annotated[int, Bounds(ge=1)] = 16,
        min_hidden: Annotated[int, Bounds(ge=1)] = 16,
        temperature: Annotated[float, Bounds(gt=0)] = 1.0,
    ) -> OmniRouter:
        depthwise = self.groups == self.in_channels == self.out_channels
        taps = self.kernel_size[0] * self.kernel_size[1]
        hidden = max(self.in_channels // reduction, min_hidden)
        return OmniRouter(self.in_channels, self.out_channels, taps, self.experts, depthwise, hidden, temperature)

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
    ) -> ODConv2d:
        """An ODConv layer computing exactly what ``conv`` computes (see the class docstring for the scale)."""
        layer = super().from_conv(
            conv, experts, noise=noise, seed=seed, padding=padding, standardize=standardize, **router_options
        )
        if conv.bias is not None:  # the base scaled it with the kernel; the attentions do not touch it
            with torch.no_grad():
                layer.bias.copy_(conv.bias.detach().to(layer.bias.dtype).expand_as(layer.bias))
        if standardize is not None:  # experts whose standardisations average to the conv's kernel
            weight, factor = standardized_upcycle(conv.weight, experts, noise, seed, standardize.eps)
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.standardized_scale.copy_(factor * standardize.scale / layer.router.uniform_total())
        return layer  # type: ignore[return-value]

    def expert_weights(self, routing: Tensor) -> Tensor:
        """The kernel attention: the first ``K`` columns (filter, channel and spatial attentions follow)."""
        return routing[:, : self.experts]

    def lr_multipliers(self, family: str) -> dict[str, float]:
        """As every kind's for the kernel; the bias is mixed by the kernel attention alone (1/n each, unscaled)."""
        bias = matched_multiplier(family, [1.0 / self.experts] * self.experts)
        return {**super().lr_multipliers(family), "bias": bias}

    def forward(self, x: Tensor) -> Tensor:
        kernel, filt, channel, spatial = self.router(x)
        if self.capture_routing:
            parts = [kernel, channel] + [a for a in (filt, spatial) if a is not None]
            self.last_routing = torch.cat(parts, dim=1).detach()
        x, padding = self._pad_input(x)
        by_hand = self.padding == TF_SAME or self.padding_mode != "zeros"  # then ``x`` holds the padding
        geom = self._padded_geometry if by_hand else self._geometry
        attentions = (kernel, filt, channel, spatial)
        weight = self.weight
        if self.standardize is not None:
            scale = self.standardized_scale if self.gain is None else self.standardized_scale * self.gain
            weight = standardized_bank(weight, self.standardize.eps, scale)
        out = omni_conv2d(x, weight, attentions, self.bias, geom, padding, self.strategy)
        if self.static_bias is not None:
            out = out + self.static_bias.to(out.dtype)[:, None, None]
        return out
