"""The resumable training state, kept in a sidecar next to the fine-tuned model.

``OUTPUT.train.safetensors`` holds the raw weights being trained, the EMA weights, the
optimizer's buffers, the RNG states (torch, Python, NumPy) as tensors, and as JSON
metadata the position (epoch, step), history, settings, schedule, grad-scaler state and
the run's id, which the output's own training record repeats: a sidecar whose id is not
the output's belongs to another run and is refused. Written atomically, no pickle.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ..checkpoint import CheckpointError, write_safetensors_atomic

SIDECAR_KEY = "dynconv.training"
SIDECAR_FORMAT = 1


def sidecar_path(output: Path) -> Path:
    """Where the training state of ``output`` lives: ``NAME.train.safetensors`` beside it."""
    name = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(name + ".train.safetensors")


@dataclass
class TrainingState:
    """Everything a resumed run needs to continue the same run, bit for bit."""

    info: dict[str, Any] = field(default_factory=dict)  # JSON: position, history, settings, schedule, scaler, run
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # model., ema., optim., rng.

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``prefix.`` with the prefix taken off."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The torch, Python and NumPy RNG states, as JSON and tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    info = {"python": [version, gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.python": torch.tensor(internal, dtype=torch.int64),
        "rng.numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
    }
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return info, tensors


def restore_rng(info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put back the states :func:`capture_rng` took."""
    torch.set_rng_state(tensors["rng.torch"])
    version, gauss = info["python"]
    random.setstate((version, tuple(int(v) for v in tensors["rng.python"].tolist()), gauss))
    name, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimizer's state as JSON-able info plus flat tensors (for safetensors)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}, tensors


def restore_optimizer(optimizer: torch.optim.Optimizer, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Load what :func:`optimizer_state` saved."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in info["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def write_sidecar(path: Path, state: TrainingState) -> Path:
    """Write ``state`` atomically to ``path``."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.tensors.items()}
    info = {**state.info, "format": SIDECAR_FORMAT}
    return write_safetensors_atomic(tensors, path, {SIDECAR_KEY: json.dumps(info)})


def read_sidecar_info(path: Path) -> dict[str, Any] | None:
    """The JSON part of a sidecar (cheap: header only), or ``None`` if there is no sidecar."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        return json.loads(meta[SIDECAR_KEY])
    except Exception:
        raise CheckpointError(f"{path} is not a dynconv training-state file, or it is damaged") from None


def read_sidecar(path: Path) -> TrainingState:
    """A whole sidecar."""
    info = read_sidecar_info(path)
    if info is None:
        raise CheckpointError(f"training state {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return TrainingState(info, tensors)
