"""Parameters and MACs, counted by ``torch.utils.flop_counter`` on real forwards.

Hook-based counters miss dynamic convs (their work is ``F.conv2d``/``bmm`` on
reshaped tensors inside the layer); counting the aten ops that actually run
includes kernel mixing, the router and the convolution, whichever strategy runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class _FlopCounter(TorchDispatchMode):
    """``torch.utils.flop_counter``'s per-op formulas, summed over every aten op that runs.

    ``FlopCounterMode`` itself also tracks modules with autograd hooks, which fails on
    models that make views of parameters under ``no_grad`` (PiT, CaiT class tokens);
    the totals are the same without it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``, shared ones once."""
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one eval forward of ``module`` on a batch-1 input of ``input_shape``."""
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(1, *input_shape, dtype=dtype, device=device, generator=None)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), _FlopCounter() as counter:
            module(x)
    finally:
        module.train(was_training)
    return counter.flops // 2
