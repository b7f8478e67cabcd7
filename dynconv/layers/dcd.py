"""DCD, dynamic convolution decomposition (Li et al., ICLR 2021): a static kernel plus a low-rank dynamic term.

``W(x) = Lambda(x) * W0 + P Phi(x) Q^T``. The static kernel ``W0`` is the original conv's;
``Lambda(x)`` scales each output channel; the dynamic term is a 1x1 path: ``Q`` compresses
the input, sampled at the centre of each of the conv's windows (so with the conv's
stride, padding and dilation), to ``L`` latent channels, the per-sample ``L x L`` matrix
``Phi(x)`` mixes them, and ``P`` expands them to ``C_out``. Its output is added to the
static conv's. Grouped convs get one latent space per group (``Q``, ``Phi`` and ``P`` are
block-diagonal); for a depthwise conv the latent size is 1, so the dynamic term is a
per-sample, per-channel 1x1 (centre-tap) correction.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.forms import Form, register_form
from ..core.kernels import plain_conv
from ..core.rules import dcd_forms_whole_kernel, dcd_keeps_kernel_static
from ..core.scope import allowed_strategies, note_strategy
from ..experts import DEFAULT_NOISE
from ..functional import dynamic_conv2d
from ..geometry import ConvGeometry, Padding
from ..routing import Router, SplitLinear, global_pool, stack_legacy_heads
from ..standardization import WeightStandardization
from .base import TF_SAME, DynamicConv2d
from .registry import register
from .spec import Bounds, KindInfo

# DCD's own form: the static kernel stays a constant conv, the dynamic parts act on the maps.
DECOMPOSED = register_form(
    Form("decomposed", None, per_sample_kernels=False, batch_agnostic=True, takes_terms=False, kind="dcd")
)


def default_latent(channels_per_group: int) -> int:
    """The latent size ``L`` per group when none is given: ``round(sqrt(C_in / groups))``, at least 1."""
    return max(1, round(math.sqrt(channels_per_group)))


class DCDRouter(Router):
    """GAP -> linear -> ReLU -> two heads: ``Lambda = 2 sigmoid(.)`` (``[B, C_out]``) and ``Phi`` (``[B, g, L, L]``).

    Both heads are one linear layer (``head``, a :class:`~dynconv.routing.SplitLinear`, a GEMM
    per head as their activations differ); checkpoints of format 2 kept them as two layers
    (``scale_head``, ``phi_head``) and load into it.
    No BatchNorm, so batch size 1 trains. Zeroed heads give ``Lambda = 1`` exactly
    (``2 * sigmoid(0)``) and ``Phi = 0``, which is how a converted layer starts exact;
    the hidden layer keeps its random features so the heads get gradients at once.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, latent: int, hidden: int) -> None:
        super().__init__()
        self.groups = groups
        self.latent = latent
        self.fc = nn.Linear(in_channels, hidden)
        self.head = SplitLinear(hidden, {"scale": out_channels, "phi": groups * latent * latent}, sigmoid=("scale",))
        stack_legacy_heads(self, "head", {"scale": "scale_head", "phi": "phi_head"})

    def uniform_total(self) -> float:
        return 1.0  # Lambda = 1 once zeroed: the static kernel needs no rescaling

    def zero_(self) -> DCDRouter:
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.head(F.relu(self.fc(global_pool(x))))
        scale = 2.0 * out["scale"]  # 2 sigmoid(.)
        phi = out["phi"].reshape(-1, self.groups, self.latent, self.latent)  # batch stays symbolic
        return scale, phi


def centre_taps(x: Tensor, pad: tuple[int, int, int, int], geom: ConvGeometry) -> Tensor:
    """The input at the centre of each of the conv's windows: ``[B, C_in, H_out, W_out]``.

    ``pad`` is the padding still to apply (``(0, 0, 0, 0)`` when ``x`` is already padded);
    the centre of an even kernel is the tap just before its middle. Where a centre falls
    in the padding, it reads zero. Slicing, no copy when the centres lie inside ``x``.
    """
    left, right, top, bottom = pad
    height, width = x.shape[-2:]
    out_h = (height + top + bottom - geom.dilation[0] * (geom.kernel[0] - 1) - 1) // geom.stride[0] + 1
    out_w = (width + left + right - geom.dilation[1] * (geom.kernel[1] - 1) - 1) // geom.stride[1] + 1
    start_h = geom.dilation[0] * ((geom.kernel[0] - 1) // 2) - top
    start_w = geom.dilation[1] * ((geom.kernel[1] - 1) // 2) - left
    end_h = start_h + geom.stride[0] * (out_h - 1)  # last row read, inclusive
    end_w = start_w + geom.stride[1] * (out_w - 1)
    extra = (max(0, -start_w), max(0, end_w - (width - 1)), max(0, -start_h), max(0, end_h - (height - 1)))
    if any(extra):
        x = F.pad(x, extra)
        start_h, end_h, start_w, end_w = start_h + extra[2], end_h + extra[2], start_w + extra[0], end_w + extra[0]
    return x[:, :, start_h : end_h + 1 : geom.stride[0], start_w : end_w + 1 : geom.stride[1]]


def add_low_rank(
    out: Tensor, centres: Tensor, q: Tensor, phi: Tensor, p: Tensor, bias: Tensor | None, groups: int
) -> Tensor:
    """``out + P Phi Q centres + bias`` per sample and group, the addition fused into one batched matmul.

    ``q`` is ``[g*L, C_in/g]``, ``phi`` ``[B, g, L, L]``, ``p`` ``[C_out, L]``. ``P Phi`` is
    formed first (``C_out x L`` per sample, small); the bias rides along as one more
    latent channel that is constant one, so no separate pass over the output adds it.
    """
    batch, c_out, h_out, w_out = out.shape
    latent = phi.shape[-1]
    # Q as a matmul: several times faster here than F.conv2d's 1x1 with L output channels
    z = q.reshape(groups, latent, -1) @ centres.reshape(batch, groups, -1, h_out * w_out)  # [B, g, L, H'W']
    u = p.reshape(groups, c_out // groups, latent) @ phi  # [B, g, C_out/g, L]
    if bias is not None:
        z = torch.cat([z, torch.ones_like(z[:, :, :1])], dim=2)
        u = torch.cat([u, bias.reshape(1, groups, c_out // groups, 1).expand(batch, -1, -1, -1).to(u.dtype)], dim=3)
    if bias is None and latent == 1:  # depthwise: a per-channel outer product, elementwise
        summed = torch.addcmul(out.reshape(batch, groups, c_out // groups, h_out * w_out), u, z)
        return summed.reshape(batch, c_out, h_out, w_out)
    flat = out.reshape(batch * groups, c_out // groups, h_out * w_out)
    u = u.reshape(batch * groups, c_out // groups, -1)
    summed = torch.baddbmm(flat, u, z.reshape(batch * groups, -1, z.shape[-1]))
    return summed.reshape(batch, c_out, h_out, w_out)


def decomposed_conv2d(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    phi: Tensor,
    q: Tensor,
    p: Tensor,
    bias: Tensor | None,
    geom: ConvGeometry,
    padding: Padding,
    strategy: str | None,
) -> Tensor:
    """``conv(x, Lambda W0 + P Phi Q^T) + bias`` per sample, the fastest way for the shape.

    Where the whole kernel is small per sample, it is formed and run through the core
    (``Lambda`` as a kernel factor, ``P Phi Q`` as an offset on the centre tap): depthwise
    convs (folded into conv groups like the static conv, no extra pass over any map) and
    1x1 convs on maps with more pixels than the kernel has rows and columns (a batched
    matmul). Otherwise the core runs the static kernel with ``Lambda`` as
    per-output-channel routing (one expert: the static conv and a scale, or one conv at
    batch 1) and the low-rank term is added on the centre taps. ``geom.pad`` is the
    padding ``padding`` applies.
    """
    c_out, per_group, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3], weight.shape[4]
    conv_args = (geom.stride, padding, geom.dilation, geom.groups)
    if dcd_forms_whole_kernel(x.shape, weight.shape, geom):
        groups, latent = geom.groups, phi.shape[-1]
        low = p.reshape(groups, c_out // groups, latent) @ phi @ q.reshape(groups, latent, per_group)
        offset = low.reshape(-1, c_out, per_group, 1, 1)
        if (kh, kw) != (1, 1):  # on the centre tap, zero elsewhere
            offset = F.pad(offset, ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2))
        ones = torch.ones_like(scale[:, :1])
        bias_bank = None if bias is None else bias.reshape(1, -1)
        factor = scale.reshape(-1, c_out, 1, 1, 1)
        return dynamic_conv2d(
            x, weight, ones, bias_bank, *conv_args, strategy=strategy, modulation=(factor,), offset=offset
        )
    out = dynamic_conv2d(x, weight, scale.unsqueeze(1), None, *conv_args, strategy=strategy)
    return add_low_rank(out, centre_taps(x, geom.pad, geom), q, phi, p, bias, geom.groups)


def window_centres(x: Tensor, geom: ConvGeometry) -> Tensor:
    """:func:`centre_taps` for ``x`` padded by ``geom.pad``; where the centres are every
    ``stride``-th pixel from the corner (odd kernels, the usual symmetric padding) a strided
    view, ``x`` itself at stride 1."""
    if centres_on_grid(x, geom):
        return x if geom.stride == (1, 1) else x[:, :, :: geom.stride[0], :: geom.stride[1]]
    return centre_taps(x, geom.pad, geom)


def centres_on_grid(x: Tensor, geom: ConvGeometry) -> bool:
    """Whether the conv's window centres are exactly the pixels a strided 1x1 conv on ``x`` reads."""
    start_h = geom.dilation[0] * ((geom.kernel[0] - 1) // 2) - geom.pad[2]
    start_w = geom.dilation[1] * ((geom.kernel[1] - 1) // 2) - geom.pad[0]
    strided = ConvGeometry((1, 1), geom.stride, (1, 1), (0, 0, 0, 0), geom.groups)
    return (start_h, start_w) == (0, 0) and strided.output_size(*x.shape[-2:]) == geom.output_size(*x.shape[-2:])


def centre_conv(x: Tensor, kernel: Tensor, geom: ConvGeometry) -> Tensor:
    """A 1x1 conv of ``kernel`` (``[C, C_in/g, 1, 1]``) on the centres of the conv's windows:
    strided on ``x`` where they lie on its grid (no copy), else on the centres sliced out."""
    if centres_on_grid(x, geom):
        return F.conv2d(x, kernel, None, geom.stride, 0, 1, geom.groups)
    return F.conv2d(centre_taps(x, geom.pad, geom), kernel, None, 1, 0, 1, geom.groups)


def static_decomposed_conv2d(
    x: Tensor, weight: Tensor, scale: Tensor, phi: Tensor, q: Tensor, p: Tensor, bias: Tensor | None, geom: ConvGeometry
) -> Tensor:
    """``Lambda * conv(x, W0) + P (Phi (Q centres)) + bias`` with every kernel a constant: the deployment form.

    ``conv(x, W0)`` is the original conv (a runtime pre-packs its constant weight), ``Q`` a
    thin 1x1 conv on the window centres and ``P`` a 1x1 conv carrying the bias; only
    ``Lambda`` (a per-channel scale) and the ``L x L`` product ``Phi`` are per sample.
    Depthwise (``L = 1``): ``P Phi Q`` is one per-channel scale of the centres.
    """
    groups, latent = geom.groups, phi.shape[-1]
    out = plain_conv(x, weight[0], None, geom, groups) * scale[:, :, None, None].to(x.dtype)
    c_out = weight.shape[1]
    if latent == 1 and c_out == groups:  # one latent channel per output channel: scales only
        low = (p.reshape(1, c_out) * phi.reshape(-1, c_out) * q.reshape(1, c_out))[:, :, None, None]
        low = window_centres(x, geom) * low.to(x.dtype)
        return low + out if bias is None else low + (out + bias[:, None, None].to(x.dtype))
    z = centre_conv(x, q.reshape(groups * latent, -1, 1, 1), geom)
    height, width = z.shape[-2:]
    mixed = phi @ z.reshape(z.shape[0], groups, latent, height * width)  # [B, g, L, H'W']
    mixed = mixed.reshape(z.shape[0], groups * latent, height, width)
    return F.conv2d(mixed, p.reshape(c_out, latent, 1, 1), bias, 1, 0, 1, groups) + out


def standardized_kernel(weight: Tensor, standardize: WeightStandardization, gain: Tensor | None) -> Tensor:
    """``gain * scale * (W - mean) / sqrt(var + eps)`` per output channel of ``[1, C_out, ...]``, as timm's
    ``StdConv2d`` (biased variance)."""
    flat = weight.reshape(weight.shape[1], -1)
    mean = flat.mean(1, keepdim=True)
    var = flat.var(1, correction=0, keepdim=True)
    out = (flat - mean) * torch.rsqrt(var + standardize.eps) * standardize.scale
    if gain is not None:
        out = out * gain.reshape(-1, 1)
    return out.reshape(weight.shape)


# Leaf calls for torch.fx: they read shapes, which a symbolic trace cannot branch on.
for _leaf in ("decomposed_conv2d", "static_decomposed_conv2d", "standardized_kernel"):
    torch.fx.wrap(_leaf)


@register
class DCDConv2d(DynamicConv2d):
    """``W(x) = Lambda(x) W0 + P Phi(x) Q^T``: the static kernel, rescaled per output channel, plus a low-rank term.

    ``weight`` is ``[1, C_out, C_in/g, kH, kW]`` (``W0``, one "expert"), ``bias`` ``[1, C_out]``
    is static (``Lambda`` does not scale it); ``q`` is ``[g*L, C_in/g]`` and ``p`` is
    ``[C_out, L]``. Router options: ``latent`` (``L`` per group, default
    ``round(sqrt(C_in / groups))``), ``reduction`` (16) and ``min_hidden`` (16) for the
    hidden width ``max(C_in / reduction, min_hidden)``. ``experts`` is always 1.

    Exact at conversion: ``W0`` is the conv's kernel, ``Lambda = 2 sigmoid(0) = 1`` and
    ``Phi = 0`` (zeroed heads), so the dynamic term is zero while ``P`` and ``Q`` are
    random: ``Phi``'s head gets gradients at the first step (LoRA-style: one zero factor),
    ``P`` and ``Q`` from the second.
    """

    kind = "dcd"
    has_experts = False
    #: 1 for every optimizer: the 30x SGD rule is for softmax routers over noisy experts; DCD at 30x under SGD
    #: ended 0.60 points below static on Fashion-MNIST (benchmarks/results/pays.md, pays-sgd-router30).
    router_lr_multipliers: ClassVar[dict[str, float]] = {"sgd": 1.0, "adam": 1.0, "trust": 1.0}
    routing_unshareable = "computes its kernel its own way, not as one routing vector over its experts"
    info = KindInfo(
        title="DCD: dynamic convolution decomposition (Li et al., ICLR 2021)",
        formula="W(x) = Lambda(x) W0 + P Phi(x) Q^T: the static kernel scaled per output channel, plus a "
        "1x1 low-rank term (Q: C_in -> L at the conv's stride, Phi(x): L x L per sample, P: L -> C_out), "
        "L ~ sqrt(C_in); per group for grouped convs (L = 1 for depthwise)",
        routing="global average pool -> linear (/reduction) -> ReLU -> heads: Lambda = 2 sigmoid (C_out), "
        "Phi (L x L); no BatchNorm",
        parameters="the static conv, plus L x (C_in + C_out) for Q and P, plus a small router "
        "(C_in x C_in/16 + C_in/16 x (C_out + L^2))",
        speed="k x k convs: the static conv (one expert: output scaled by Lambda), two thin 1x1 convs and an "
        "L x L product per sample, added in one batched matmul; depthwise and 1x1 convs on large maps: one "
        "small per-sample kernel through the shared core, about the static cost",
    )

    def __init__(self, *args: Any, experts: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, experts=1, **kwargs)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        latent = self.router.latent
        self.q = nn.Parameter(torch.empty(self.groups * latent, self.in_channels // self.groups, **factory))
        self.p = nn.Parameter(torch.empty(self.out_channels, latent, **factory))
        #: The geometry of the conv on an input already padded by hand (TF 'same', padding modes).
        self._padded_geometry = replace(self._geometry, pad=(0, 0, 0, 0))
        self._reset_low_rank()

    def _build_router(
        self,
        latent: Annotated[int | None, Bounds(ge=1)] = None,
        reduction: Annotated[int, Bounds(ge=1)] = 16,
        min_hidden: Annotated[int, Bounds(ge=1)] = 16,
    ) -> DCDRouter:
        per_group = self.in_channels // self.groups
        size = default_latent(per_group) if latent is None else latent
        hidden = max(self.in_channels // reduction, min_hidden)
        return DCDRouter(self.in_channels, self.out_channels, self.groups, size, hidden)

    def reset_parameters(self) -> None:
        """From-scratch initialisation: ``W0`` as ``nn.Conv2d``, ``Q`` and ``P`` as ``nn.Linear``."""
        super().reset_parameters()
        if hasattr(self, "q"):
            self._reset_low_rank()

    def _reset_low_rank(self) -> None:
        """``Q`` and ``P`` as ``nn.Linear`` initialises its weight: fan-in-scaled uniform."""
        for factor in (self.q, self.p):
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5))

    def expert_parameters(self) -> list[nn.Parameter]:
        """The kernels: ``W0``, its bias, ``Q`` and ``P`` (and a standardisation gain)."""
        return [*super().expert_parameters(), self.q, self.p]

    def expert_weights(self, routing: Tensor) -> Tensor:
        """The one 'expert' (the static kernel) at weight 1 for every image: DCD mixes no experts."""
        return routing.new_ones(routing.shape[0], 1)

    def lr_multipliers(self, family: str) -> dict[str, float]:
        """All ones but the router's: ``W0`` is the conv's kernel under ``Lambda = 1`` and the bias is static."""
        return {
            "weight": 1.0,
            "bias": 1.0,
            "gain": 1.0,
            "static_bias": 1.0,
            "q": 1.0,
            "p": 1.0,
            "router": self.router_lr_multipliers[family],
        }

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        experts: int = 1,
        *,
        noise: float = DEFAULT_NOISE,
        seed: int = 0,
        padding: Padding | None = None,
        standardize: WeightStandardization | None = None,
        **router_options: Any,
    ) -> DCDConv2d:
        """A DCD layer computing exactly what ``conv`` computes: ``W0 = conv.weight``, ``Lambda = 1``, ``Phi = 0``.

        ``experts`` and ``noise`` are accepted for a uniform API and ignored (one static
        kernel, nothing to tell apart); ``seed`` seeds ``P``, ``Q`` and the router.
        """
        layer = super().from_conv(
            conv, 1, noise=0.0, seed=seed, padding=padding, standardize=standardize, **router_options
        )
        return layer  # type: ignore[return-value]

    def fold_affine_(self, scale: Tensor, shift: Tensor) -> str:
        """``scale * layer(x) + shift``: ``scale`` into ``W0``, ``P`` and the bias, ``shift`` into the bias.

        ``Lambda`` and the dynamic term are linear in ``W0`` and ``P``, and the bias is
        static, so every BatchNorm folds exactly (a standardised ``W0`` refuses, as for every kind).
        """
        if self.standardize is not None:
            raise ValueError("a weight-standardised layer renormalises its kernel, which would undo a folded scale")
        with torch.no_grad():
            self.weight.copy_((self.weight.double() * scale.view(1, -1, 1, 1, 1)).to(self.weight.dtype))
            self.p.copy_((self.p.double() * scale.view(-1, 1)).to(self.p.dtype))
            bias = shift if self.bias is None else self.bias.detach().double()[0] * scale + shift
            bias = bias.reshape(1, -1).to(dtype=self.weight.dtype, device=self.weight.device)
            if self.bias is None:
                self.bias = nn.Parameter(bias.contiguous())
            else:
                self.bias.copy_(bias)
        return "bias"

    def forward(self, x: Tensor) -> Tensor:
        scale, phi = self.router(x)
        if self.capture_routing:
            self.last_routing = torch.cat([scale, phi.flatten(1)], dim=1).detach()
        padded, padding = self._pad_input(x)
        weight = self.weight
        if self.standardize is not None:
            weight = standardized_kernel(weight, self.standardize, self.gain)
        by_hand = self.padding == TF_SAME or self.padding_mode != "zeros"  # then ``padded`` holds the padding
        geom = self._padded_geometry if by_hand else self._geometry
        bias = None if self.bias is None else self.bias[0]
        if self.strategy is None and allowed_strategies() is None and dcd_keeps_kernel_static():
            note_strategy(DECOMPOSED.name)
            return static_decomposed_conv2d(padded, weight, scale, phi, self.q, self.p, bias, geom)
        return decomposed_conv2d(padded, weight, scale, phi, self.q, self.p, bias, geom, padding, self.strategy)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("experts=1", f"latent={self.router.latent}")
