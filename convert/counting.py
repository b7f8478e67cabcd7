"""Parameters and MACs, counted by ``torch.utils.flop_counter`` on real forwards.

Hook-based counters miss dynamic convs (their work is ``F.conv2d``/``bmm`` on
reshaped tensors inside the layer); counting the aten ops that actually run
includes kernel mixing, the router and the convolution, whichever strategy runs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        module.train(was_training)
    return counter.get_total_flops() // 2
