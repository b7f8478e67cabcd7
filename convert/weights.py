"""Loading original (static) weights from ``.safetensors`` or ``.pth``/``.pt`` files, never unpickling code."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import UserError

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema")


class WeightsError(UserError):
    """A weights file that is missing, unreadable, or does not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a weights file (``torch.load(weights_only=True)`` for ``.pth``).

    Training checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``)
    are unwrapped, and DistributedDataParallel's ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load and safetensors raise many different types
        raise WeightsError(
            f"cannot read weights file {path} ({type(exc).__name__}); expected .safetensors, or a .pth/.pt "
            "state dict readable with torch.load(weights_only=True)"
        ) from None
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def with_module_versions(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Attach ``model``'s per-module version metadata to a state dict that lacks it.

    Safetensors files carry no ``_metadata``; some modules (torchvision's MNASNet)
    refuse to load without their version. The tensors came from these same classes.
    """
    if getattr(state, "_metadata", None) is None:
        ordered = OrderedDict(state)
        ordered._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
        return ordered
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a weights file into ``model`` strictly; say what does not fit if it does not."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise WeightsError(f"weights in {path} do not fit the model: {', '.join(parts)}")
    model.load_state_dict(with_module_versions(state, model), strict=True)
    return model
