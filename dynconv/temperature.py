"""Softmax temperature control for DyConv-style routers (Chen et al. anneal 30 -> 1)."""

from __future__ import annotations

import torch
from torch import nn


def _temperature_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        buf for module in model.modules() for name, buf in module.named_buffers(recurse=False) if name == "temperature"
    ]


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set the softmax temperature of every router in ``model`` that has one; return how many."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    buffers = _temperature_buffers(model)
    with torch.no_grad():
        for buf in buffers:
            buf.fill_(float(temperature))
    return len(buffers)


class TemperatureSchedule:
    """Linear annealing from ``start`` to ``end`` over ``steps`` calls of :meth:`step`.

    Call :meth:`step` once per optimiser step (or per epoch, with ``steps`` in
    epochs); after ``steps`` calls the temperature stays at ``end``. The paper's
    default is 30 -> 1 over the first 10 epochs.
    """

    def __init__(self, model: nn.Module, steps: int, start: float = 30.0, end: float = 1.0) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if start <= 0 or end <= 0:
            raise ValueError(f"temperatures must be positive, got start={start}, end={end}")
        self.model = model
        self.steps = steps
        self.start = start
        self.end = end
        self.count = 0
        set_temperature(model, start)

    def value(self, count: int | None = None) -> float:
        """Temperature after ``count`` steps (default: the steps taken so far)."""
        count = self.count if count is None else count
        frac = min(max(count, 0), self.steps) / self.steps
        return self.start + (self.end - self.start) * frac

    def step(self) -> float:
        """Advance one step, apply the new temperature to the model, and return it."""
        self.count += 1
        temperature = self.value()
        set_temperature(self.model, temperature)
        return temperature

    def state_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "steps": self.steps, "start": self.start, "end": self.end}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.count = int(state["count"])
        self.steps = int(state["steps"])
        self.start = float(state["start"])
        self.end = float(state["end"])
        set_temperature(self.model, self.value())
