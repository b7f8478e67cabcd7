"""Softmax temperature control for routers, annealed per kind (DyConv, Chen et al.: 30 -> 1).

Each layer class declares its own fine-tuning schedule in ``temperature_annealing``
(``(start, end)`` or ``None``); :class:`TemperatureSchedule` anneals only the routers of
kinds that declare one and leaves every other temperature (ODConv's 1.0) as recorded.
"""

from __future__ import annotations

import torch
from torch import nn

from .inspection import dynamic_layers


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


def annealed_kinds(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``kind -> (start, end)`` for the kinds in ``model`` whose class anneals its temperature."""
    return {
        layer.kind: layer.temperature_annealing
        for layer in dynamic_layers(model).values()
        if layer.temperature_annealing is not None and _temperature_buffers(layer)
    }


def annealed_buffers(model: nn.Module) -> list[tuple[torch.Tensor, float, float]]:
    """``(temperature buffer, start, end)`` of every router whose layer's kind anneals (shared ones once)."""
    seen: set[int] = set()
    found = []
    for layer in dynamic_layers(model).values():
        if layer.temperature_annealing is None:
            continue
        for buf in _temperature_buffers(layer):
            if id(buf) not in seen:
                seen.add(id(buf))
                found.append((buf, *layer.temperature_annealing))
    return found


class TemperatureSchedule:
    """Linear annealing over ``steps`` calls of :meth:`step`, for the kinds that declare it.

    Each annealed router goes from its kind's ``start`` to ``end`` (DyConv: 30 -> 1);
    ``start``/``end`` override those. Routers of other kinds keep their temperature.
    After ``steps`` calls the temperature stays at ``end``.
    """

    def __init__(self, model: nn.Module, steps: int, start: float | None = None, end: float | None = None) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        for value in (start, end):
            if value is not None and value <= 0:
                raise ValueError(f"temperatures must be positive, got start={start}, end={end}")
        self.model = model
        self.steps = steps
        self.targets = [
            (buf, first if start is None else start, last if end is None else end)
            for buf, first, last in annealed_buffers(model)
        ]
        self.count = 0
        self._apply()

    def __bool__(self) -> bool:
        return bool(self.targets)

    def fraction(self, count: int | None = None) -> float:
        """How far along the annealing is after ``count`` steps (default: the steps taken so far)."""
        count = self.count if count is None else count
        return min(max(count, 0), self.steps) / self.steps

    def value(self, count: int | None = None) -> float | None:
        """The first annealed router's temperature after ``count`` steps; ``None`` if nothing anneals."""
        if not self.targets:
            return None
        _, start, end = self.targets[0]
        return start + (end - start) * self.fraction(count)

    def _apply(self) -> None:
        frac = self.fraction()
        with torch.no_grad():
            for buf, start, end in self.targets:
                buf.fill_(start + (end - start) * frac)

    def step(self) -> float | None:
        """Advance one step, apply the new temperatures to the model, and return the first."""
        self.count += 1
        self._apply()
        return self.value()

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.count = int(state["count"])
        self.steps = int(state["steps"])
        self._apply()
