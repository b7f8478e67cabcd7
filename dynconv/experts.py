"""Experts from one trained kernel: copies that mix back to it exactly, yet can diverge.

Every expert is ``scale * (W + eps_k)`` with ``sum_k eps_k = 0``. Under routing that
is the same for every expert and sums to ``1 / scale`` the mixed kernel is exactly
``W``; the zero-sum noise makes the experts differ, so their gradients (through the
router) differ and training can separate them. This is "sparse upcycling" applied
to convolution kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Experts per layer when none are asked for (every kind with a bank of experts, and the converter).
DEFAULT_EXPERTS = 4
#: 10% of the kernel's RMS: a softmax router's gradient at conversion is proportional to it (0.01: near uniform)
DEFAULT_NOISE = 0.1


def zero_sum_noise(shape: tuple[int, ...], experts: int, seed: int) -> Tensor:
    """Standard-normal noise ``[experts, *shape]`` (drawn in float32), centred across experts in float64."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((experts, *shape), generator=gen, dtype=torch.float32).double()
    return noise - noise.mean(dim=0, keepdim=True)


def upcycle(
    weight: Tensor,
    bias: Tensor | None,
    experts: int,
    *,
    scale: float = 1.0,
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Stack ``experts`` perturbed copies of ``weight`` (and plain copies of ``bias``).

    ``noise`` is relative to the kernel's RMS, so it means the same for every layer;
    the same ``seed`` gives bit-identical experts on any device.
    """
    if experts < 1:
        raise ValueError(f"experts must be >= 1, got {experts}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    w64 = weight.detach().to("cpu", torch.float64)
    stacked = w64.unsqueeze(0).expand(experts, *w64.shape)
    if noise > 0 and experts > 1:
        rms = w64.pow(2).mean().sqrt().item()
        stacked = stacked + zero_sum_noise(tuple(w64.shape), experts, seed) * (noise * (rms if rms > 0 else 1e-3))
    stacked = (scale * stacked).to(weight.device, weight.dtype)
    stacked_bias = None
    if bias is not None:
        b64 = bias.detach().to("cpu", torch.float64)
        stacked_bias = (scale * b64).unsqueeze(0).expand(experts, -1).to(bias.device, bias.dtype).clone()
    return stacked, stacked_bias
