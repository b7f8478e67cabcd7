"""Shared routing: the dynamic convs of one block mixing their experts with one routing vector.

CondConv's reference EfficientNet computes one routing vector per block, from the block's
input, and hands it to the block's expand, depthwise and project convs. Here the block's
first dynamic conv reads the block's input (the converter checks that on a probe forward),
so its router *is* the block's router: it computes the routing and leaves it in the block's
:class:`RoutingShare`; the block's other layers take it from there within the same forward
instead of running routers of their own.

- Exact: every member was built against a router of the same type (same uniform weights
  once zeroed), so a freshly shared block still computes what the original convs did.
- State: the share holds no parameters. Each member's ``router`` attribute is the first
  layer's router module, so ``state_dict`` lists it under every member's name (tied
  tensors, like any module reachable under several names) and it is trained once.
- Traceable: the handoff is a plain attribute set by the first layer and cleared by the
  last, so ``torch.fx``, ``torch.export`` and ``torch.compile`` see one router output
  wired into every member, and no tensor outlives a forward.
- Limits: the members must run in the recorded order in each forward (the first one
  first), and one model instance must not run two forwards at once in different threads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers.base import DynamicConv2d


class RoutingShare(nn.Module):
    """The hand-off of one block's routing from its first dynamic layer to the others.

    Registered as ``routing_share`` on every member (so it is copied, replicated and shown
    with the model) and holding no parameters or buffers: nothing in ``state_dict``.
    """

    def __init__(self, block: str, members: int) -> None:
        super().__init__()
        if members < 2:
            raise ValueError(f"a shared routing needs at least two layers, got {members}")
        self.block = block
        self.members = members
        self.routing: Tensor | None = None

    def route(self, router: nn.Module, x: Tensor, position: int) -> Tensor:
        """Routing for the member at ``position``: computed by the first (from ``x``), taken by the rest."""
        if position == 0:
            routing = router(x)
            self.routing = routing
            return routing
        routing = self.routing
        if routing is None:
            raise RuntimeError(
                f"a layer of block {self.block!r} shares its routing, but the block's first dynamic conv "
                "has not run in this forward; run the block as a whole"
            )
        if position == self.members - 1:
            self.routing = None  # the last member: nothing kept between forwards
        return routing

    def extra_repr(self) -> str:
        return f"block={self.block!r}, members={self.members}"


def sharing_refusal(layer: DynamicConv2d) -> str | None:
    """Why ``layer`` cannot use a routing computed for another conv, or ``None`` if it can.

    Sharing needs one routing weight per expert and sample (``[B, K]``), used by the stock
    mixture of experts; a kind that routes otherwise (DyNet per output channel, DCD and
    ODConv computing their kernel their own way) says why in ``routing_unshareable``.
    """
    reason = type(layer).routing_unshareable
    if reason is not None:
        return f"{layer.kind} {reason}"
    param = next(layer.router.parameters(), None)
    factory = {} if param is None else {"dtype": param.dtype, "device": param.device}
    try:  # the declaration checked on the router: one weight per expert
        with torch.no_grad():
            sample = layer.router.eval()(torch.zeros(1, layer.in_channels, 1, 1, **factory))
    except Exception as exc:  # a router of a kind this module does not know
        return f"its router does not map a pooled input to routing weights ({type(exc).__name__})"
    finally:
        layer.router.train(layer.training)
    if not isinstance(sample, Tensor) or sample.dim() != 2 or sample.shape[1] != layer.experts:
        return f"{layer.kind} routes otherwise than one weight per expert, which no other conv can use"
    return None


def compatibility(leader: DynamicConv2d, layer: DynamicConv2d) -> str | None:
    """Why ``layer`` cannot use ``leader``'s router, or ``None`` if it can (same kind, experts, options)."""
    if type(layer) is not type(leader):
        return f"its kind ({layer.kind}) differs from the block's first dynamic conv ({leader.kind})"
    if layer.experts != leader.experts:
        return f"its {layer.experts} experts differ from the {leader.experts} of the block's first dynamic conv"
    if layer.router_options != leader.router_options:
        return f"its routing options {layer.router_options} differ from the first conv's {leader.router_options}"
    if not math.isclose(layer.router.uniform_total(), leader.router.uniform_total()):
        return "its router's uniform weights differ from the first conv's, so sharing would change its output"
    return None


def share_routing(layers: list[DynamicConv2d], block: str) -> RoutingShare:
    """Make ``layers`` (in the order a forward runs them) use ``layers[0]``'s router; returns the share.

    ``layers[0]`` must read the block's input. Raises ``ValueError`` when a layer cannot
    share (see :func:`sharing_refusal` and :func:`compatibility`).
    """
    if len(layers) < 2:
        raise ValueError(f"block {block!r}: a shared routing needs at least two layers, got {len(layers)}")
    leader = layers[0]
    for layer in layers:
        reason = sharing_refusal(layer) or compatibility(leader, layer)
        if reason is not None:
            raise ValueError(f"block {block!r}: a layer cannot share its routing: {reason}")
        if "routing_share" in layer._modules:
            raise ValueError(f"block {block!r}: a layer already shares the routing of {layer.routing_share.block!r}")
    share = RoutingShare(block, len(layers))
    for position, layer in enumerate(layers):
        layer.routing_share = share
        layer.routing_position = position
        if position:
            layer.router = leader.router
    return share


def count_routers(model: nn.Module) -> int:
    """How many distinct routers the dynamic layers of ``model`` run (a shared one counts once)."""
    return len({id(m.router) for m in model.modules() if isinstance(m, DynamicConv2d)})
