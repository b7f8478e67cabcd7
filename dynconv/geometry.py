"""Convolution geometry: normalised stride/padding/dilation and output sizes.

One place turns the many spellings ``F.conv2d`` accepts (int, tuple, ``'same'``,
``'valid'``) into explicit per-side padding, so every strategy pads identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import torch

IntPair: TypeAlias = int | tuple[int, int]
Padding: TypeAlias = int | tuple[int, int] | str


def as_pair(value: IntPair, name: str) -> tuple[int, int]:
    """Return ``value`` as an ``(h, w)`` pair, the way ``nn.Conv2d`` reads its arguments."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(value)
    if len(pair) == 1:
        return (int(pair[0]), int(pair[0]))
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def resolve_padding(
    padding: Padding,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """Explicit ``(left, right, top, bottom)`` padding, in ``F.pad`` order.

    ``'same'`` pads ``dilation * (kernel - 1)`` in total per dimension, the extra
    pixel on the right/bottom when odd, exactly as ``nn.Conv2d`` does.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d)")
        sides = []
        for k, d in ((kernel[1], dilation[1]), (kernel[0], dilation[0])):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return (sides[0], sides[1], sides[2], sides[3])
    ph, pw = as_pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (pw, pw, ph, ph)


@dataclass(frozen=True)
class ConvGeometry:
    """The static description of one convolution: kernel, stride, dilation, padding, groups."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int]  # (left, right, top, bottom)
    groups: int

    @classmethod
    def build(
        cls,
        kernel: tuple[int, int],
        stride: IntPair,
        padding: Padding,
        dilation: IntPair,
        groups: int,
    ) -> ConvGeometry:
        """Validate and normalise ``F.conv2d``-style arguments."""
        stride_p = as_pair(stride, "stride")
        dilation_p = as_pair(dilation, "dilation")
        if min(stride_p) < 1:
            raise ValueError(f"stride must be positive, got {stride!r}")
        if min(dilation_p) < 1:
            raise ValueError(f"dilation must be positive, got {dilation!r}")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        pad = resolve_padding(padding, kernel, stride_p, dilation_p)
        return cls(kernel, stride_p, dilation_p, pad, groups)

    @property
    def symmetric(self) -> bool:
        """True when ``F.conv2d``'s own ``padding=(ph, pw)`` can express the padding."""
        left, right, top, bottom = self.pad
        return left == right and top == bottom

    @property
    def conv_padding(self) -> tuple[int, int]:
        """``(ph, pw)`` for ``F.conv2d``; only meaningful when :attr:`symmetric`."""
        return (self.pad[2], self.pad[0])

    @property
    def pointwise(self) -> bool:
        """A 1x1 kernel: the convolution is a matrix product per pixel."""
        return self.kernel == (1, 1)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial output size for an input of ``height x width``."""
        left, right, top, bottom = self.pad
        out = []
        for size, lo, hi, k, s, d in (
            (height, top, bottom, self.kernel[0], self.stride[0], self.dilation[0]),
            (width, left, right, self.kernel[1], self.stride[1], self.dilation[1]),
        ):
            span = size + lo + hi - d * (k - 1) - 1
            if span < 0:
                raise ValueError(
                    f"input spatial size {height}x{width} is smaller than the dilated kernel {self.kernel}"
                )
            out.append(span // s + 1)
        return (out[0], out[1])


def tf_same_padding(
    size: tuple[int, int] | torch.Size,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """TensorFlow 'SAME' padding for an input of ``size``: ``ceil(size / stride)`` outputs,
    the extra pixel on the right/bottom (as timm's ``Conv2dSame``)."""
    sides = []
    for length, k, s, d in ((size[1], kernel[1], stride[1], dilation[1]), (size[0], kernel[0], stride[0], dilation[0])):
        total = max((-(-int(length) // s) - 1) * s + (k - 1) * d + 1 - int(length), 0)
        sides += [total // 2, total - total // 2]
    return (sides[0], sides[1], sides[2], sides[3])
