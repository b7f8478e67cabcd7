"""Shared routing per block: plan which converted convs share one router, and apply it.

``share_routing: block`` (a recipe's defaults or rules, ``convert_model(share_routing=...)``,
``dynconv convert --share-routing``) asks that the converted convs of one block mix their
experts with one routing vector computed from the block's input, as the CondConv paper's
EfficientNet does. Blocks come from the model's forward (:mod:`convert.blocks`); each
block's first converted conv that can share becomes the router of the group, provided it
reads the block's input; convs that cannot share (DyNet's per-channel routing, other kinds
or options than the first conv, outside any block) keep their own router, each with its
reason in the plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from dynconv import DynamicConv2d
from dynconv.shared_routing import compatibility, share_routing, sharing_refusal

from .blocks import Block, find_blocks
from .counting import count_macs, count_params
from .errors import UserError

#: The values ``share_routing`` takes: each conv its own router, or one router per block.
SHARE_MODES = ("none", "block")


@dataclass
class SharedGroup:
    """The converted convs of one block that share one router (the first one's), in forward order."""

    block: str
    block_type: str
    layers: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BlockRecord:
    """A module that qualifies as a block: its converted convs and why it qualifies."""

    name: str
    type: str
    layers: list[str]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UnsharedRecord:
    """A converted conv asked to share that keeps its own router, and why."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SharingPlan:
    """Which blocks were found, which convs share a router, and which do not and why."""

    groups: list[SharedGroup] = field(default_factory=list)
    blocks: list[BlockRecord] = field(default_factory=list)
    unshared: list[UnsharedRecord] = field(default_factory=list)

    @property
    def routers_saved(self) -> int:
        """Routers the sharing removed: one fewer than its layers per group."""
        return sum(len(g.layers) - 1 for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [g.to_dict() for g in self.groups],
            "blocks": [b.to_dict() for b in self.blocks],
            "unshared": [u.to_dict() for u in self.unshared],
            "routers_saved": self.routers_saved,
        }


def check_mode(value: str | None) -> str | None:
    """``value`` if it is a sharing mode (or ``None``); a :class:`UserError` otherwise."""
    if value is not None and value not in SHARE_MODES:
        raise UserError(f"share_routing must be one of {', '.join(SHARE_MODES)}, got {value!r}")
    return value


def _group(block: Block, layers: dict[str, DynamicConv2d], wanted: dict[str, bool]) -> tuple[list[str], dict[str, str]]:
    """The members of ``block`` that share (first = router) and the reason for each that does not."""
    reasons: dict[str, str] = {}
    leader: str | None = None
    members: list[str] = []
    for name, reads_input in zip(block.layers, block.reads_input, strict=True):
        if not wanted.get(name, False):
            continue  # not asked to share: keeps its router, nothing to explain
        refusal = sharing_refusal(layers[name])
        if refusal is not None:
            reasons[name] = refusal
        elif leader is None and not reads_input:
            reasons[name] = (
                f"the first conv of block {block.name} that can share routing reads a transformed input, "
                "not the block's input"
            )
        elif leader is None:
            leader = name
            members.append(name)
        else:
            mismatch = compatibility(layers[leader], layers[name])
            if mismatch is None:
                members.append(name)
            else:
                reasons[name] = mismatch
    if leader is not None and len(members) < 2:
        reasons[leader] = f"the only conv of block {block.name} that can share routing"
        members = []
    if leader is None or not members:
        for name in block.layers:
            if wanted.get(name, False) and name not in reasons:
                reasons[name] = f"no other conv of block {block.name} can share its routing"
    return members, reasons


def plan_sharing(
    model: nn.Module, layers: dict[str, DynamicConv2d], wanted: dict[str, bool], input_shape: tuple[int, int, int]
) -> SharingPlan:
    """Find the blocks around ``layers`` (converted convs by name) and group those ``wanted`` to share."""
    survey = find_blocks(model, layers, input_shape)
    plan = SharingPlan(blocks=[BlockRecord(b.name, b.type, b.layers, b.reason) for b in survey.blocks])
    for block in survey.blocks:
        members, reasons = _group(block, layers, wanted)
        if members:
            plan.groups.append(SharedGroup(block.name, block.type, members))
        plan.unshared += [UnsharedRecord(n, r) for n, r in reasons.items()]
    plan.unshared += [UnsharedRecord(n, r) for n, r in survey.outside.items() if wanted.get(n, False)]
    order = {name: i for i, name in enumerate(layers)}
    plan.unshared.sort(key=lambda u: order[u.name])
    return plan


def apply_groups(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Make each group's layers (``{"block", "layers"}``) share the first one's router; rebuilds checkpoints too."""
    for group in groups:
        block, names = group["block"], group["layers"]
        layers = [model.get_submodule(n) for n in names]
        if not all(isinstance(layer, DynamicConv2d) for layer in layers):
            raise UserError(f"block {block}: a layer recorded as sharing routing is not a dynamic conv")
        try:
            share_routing(layers, block)
        except ValueError as exc:
            raise UserError(str(exc)) from None


def router_cost(layer: DynamicConv2d, input_shape: tuple[int, ...] | None) -> tuple[int, int | None]:
    """Parameters and MACs (batch 1 at ``input_shape``) of ``layer``'s own router."""
    macs = None if input_shape is None else count_macs(layer.router, input_shape)
    return count_params(layer.router), macs


def share_blocks(
    model: nn.Module,
    layers: dict[str, DynamicConv2d],
    wanted: dict[str, bool],
    records: dict[str, Any],
    input_shape: tuple[int, int, int],
) -> SharingPlan:
    """Plan and apply shared routing on a freshly converted ``model``; update the layers' ``records``.

    A member that gives up its router no longer pays for it: its record's ``params_after``
    and ``macs_after`` drop by its own router's cost (the shared one is counted at the
    block's first layer), and ``routing_block`` names the block.
    """
    plan = plan_sharing(model, layers, wanted, input_shape)
    for group in plan.groups:
        for position, name in enumerate(group.layers):
            record = records[name]
            record.routing_block = group.block
            if position == 0:
                continue
            shape = None if record.input_hw is None else (record.in_channels, *record.input_hw)
            params, macs = router_cost(layers[name], shape)
            record.params_after -= params
            if record.macs_after is not None and macs is not None:
                record.macs_after -= macs
    apply_groups(model, [g.to_dict() for g in plan.groups])
    return plan
