"""How each kind of ``nn.Conv2d`` converts: extra layer options, or why it cannot.

Plain ``nn.Conv2d`` (and subclasses that do not change ``forward``) converts as is.
timm's TF-'same' convs keep their input-size-dependent padding; its weight-
standardised convs keep their standardisation (applied to each sample's mixed
kernel, see :mod:`dynconv.standardization`). Anything else with its own forward,
hooks or parametrisations would change behaviour if replaced, so it is skipped.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from dynconv import TF_SAME, WeightStandardization

# timm class name -> (TF 'same' padding, weight standardisation kind)
_TIMM_CONVS: dict[str, tuple[bool, str | None]] = {
    "Conv2dSame": (True, None),
    "StdConv2d": (False, "std"),
    "StdConv2dSame": (True, "std"),
    "ScaledStdConv2d": (False, "scaled"),
    "ScaledStdConv2dSame": (True, "scaled"),
}


class UnsupportedConvError(Exception):
    """Raised with the one-line reason a conv is left static."""


def _plain_forward(cls: type) -> bool:
    return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward


def conversion_options(conv: nn.Module) -> dict[str, Any]:
    """Keyword arguments for ``Layer.from_conv`` that preserve ``conv``'s behaviour.

    Raises :class:`UnsupportedConvError` with the reason when no dynamic layer reproduces it.
    """
    cls = type(conv)
    if conv._forward_hooks or conv._forward_pre_hooks:
        raise UnsupportedConvError("has forward hooks (e.g. old-style weight_norm) that a replacement would drop")
    if parametrize.is_parametrized(conv):
        raise UnsupportedConvError("has a parametrized weight (torch.nn.utils.parametrize) a replacement would drop")
    if _plain_forward(cls):
        return {}
    spec = _TIMM_CONVS.get(cls.__name__) if cls.__module__.startswith("timm.") else None
    if spec is None:
        raise UnsupportedConvError(
            f"{cls.__module__}.{cls.__qualname__} has its own forward, which a dynamic layer cannot reproduce"
        )
    tf_same, standardization = spec
    options: dict[str, Any] = {}
    if tf_same:
        options["padding"] = TF_SAME
    if standardization == "std":
        options["standardize"] = WeightStandardization(eps=float(conv.eps))
    elif standardization == "scaled":
        options["standardize"] = WeightStandardization(
            eps=float(conv.eps), scale=float(conv.scale), learnable_gain=True
        )
    return options
