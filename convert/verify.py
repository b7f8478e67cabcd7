"""Checking that a converted model computes what the original did, and that the check means something.

A random-initialised model can have an output that ignores its input (e.g. GoogLeNet's
std-0.01 init); comparing two such models proves nothing, so every comparison also
reports whether the original's output depends on the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

#: The contract's tolerance: max |diff| <= REL_TOL * max |original| + ABS_TOL.
REL_TOL = 1e-4
#: ``REL_TOL`` as messages print it (``1e-4``).
REL_TOL_TEXT = f"{REL_TOL:.0e}".replace("e-0", "e-")
ABS_TOL = 1e-5


@dataclass(frozen=True)
class Comparison:
    """How far a converted model's output is from the original's on one batch."""

    max_abs: float
    max_rel: float
    within_tolerance: bool
    input_sensitive: bool

    @property
    def ok(self) -> bool:
        """Equal within the contract's tolerance, on an output that depends on the input."""
        return self.within_tolerance and self.input_sensitive


def _first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    raise UserError(f"cannot compare model outputs of type {type(out).__name__}")


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's (first) output tensor in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _first_tensor(model(x))
    finally:
        model.train(was_training)


def depends_on_input(out: torch.Tensor) -> bool:
    """Whether samples of a batch of different inputs give different outputs."""
    return out.shape[0] > 1 and (out[0] - out[1]).abs().max().item() > 1e-3 * out.abs().max().item()


def difference(expected: torch.Tensor, actual: torch.Tensor) -> tuple[float, float, bool]:
    """``(max |diff|, max |diff| / max |expected|, within the contract's tolerance)``."""
    diff = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    return diff, diff / scale if scale > 0 else diff, diff <= REL_TOL * scale + ABS_TOL


def compare(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> Comparison:
    """Compare eval-mode outputs on ``x`` (a batch of at least two different inputs)."""
    expected = output(original, x)
    max_abs, max_rel, ok = difference(expected, output(converted, x))
    return Comparison(max_abs, max_rel, ok, input_sensitive=depends_on_input(expected))


def signal_preserving_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise convs and linears with variance 2/fan_in (Kaiming) and zero linear
    biases, and set zero-initialised norm scales (timm's ``zero_init_last``) and tiny
    layer-scale gammas to 1, so a random model's output depends on its input (for
    random-weight checks).

    For tests and sweeps on random models whose default init lets the signal vanish;
    never needed for trained weights.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                noise = torch.randn(module.weight.shape, generator=gen, dtype=torch.float32)
                module.weight.copy_(noise * (2.0 / fan_in) ** 0.5)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                weight = getattr(module, "weight", None)
                if weight is not None and not weight.any():
                    weight.fill_(1.0)
        for name, param in model.named_parameters():  # layer scale (CaiT, ConvNeXt): 1e-5 silences branches
            leaf = name.rsplit(".", 1)[-1]
            if ("gamma" in leaf or "layer_scale" in leaf) and param.abs().max() < 1e-3:
                param.fill_(1.0)
    return model
