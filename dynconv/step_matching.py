"""How much a converted layer's parametrisation speeds up or slows down its kernel's training, per optimizer.

A converted kernel is ``W(x) = sum_k r_k W_k`` with ``W_k = s (W + eps_k)``. A step on the
experts reaches the mixed kernel through the routing weights, so the same learning rate
moves it ``sum_k r_k^2`` times as far as the original's under SGD (the gradient of ``W_k`` is
``r_k dL/dW``), ``sum_k r_k`` times under Adam-type optimizers (whose first steps have the
same size whatever the gradient's scale) and ``s sum_k r_k`` times under trust-ratio ones
(LAMB, LARS: a step proportional to the parameter's norm). The inverse is the learning-rate
multiplier that makes a step on a freshly converted layer move its kernel as a step on the
original moves the original's (the muP idea, applied per role).
"""

from __future__ import annotations

from collections.abc import Sequence

#: Optimizer names (torch's and timm's) by how their step scales with the gradient and the parameter.
OPTIMIZER_FAMILIES: dict[str, str] = {
    **dict.fromkeys(("sgd", "momentum", "nesterov", "sgdw"), "sgd"),
    **dict.fromkeys(
        (
            "adam",
            "adamw",
            "nadam",
            "nadamw",
            "radam",
            "radamw",
            "adamax",
            "adabelief",
            "adan",
            "adopt",
            "adoptw",
            "laprop",
            "lion",
            "rmsprop",
            "rmsproptf",
            "adagrad",
        ),
        "adam",
    ),
    **dict.fromkeys(("lamb", "lambc", "lars", "larc", "nlars", "nlarc"), "trust"),
}
FAMILIES = ("sgd", "adam", "trust")


def optimizer_family(optimizer: str) -> str:
    """The family (``sgd``, ``adam``, ``trust``) of an optimizer name such as ``"adamw"`` or timm's ``"momentum"``."""
    name = optimizer.lower().split("_")[-1]  # timm's "lookahead_adamw" is an AdamW
    if name in FAMILIES:
        return name
    if name not in OPTIMIZER_FAMILIES:
        known = ", ".join(sorted({*OPTIMIZER_FAMILIES, *FAMILIES}))
        raise ValueError(f"unknown optimizer {optimizer!r}; gradient matching knows {known}")
    return OPTIMIZER_FAMILIES[name]


def matched_multiplier(family: str, routing: Sequence[float], scale: float = 1.0) -> float:
    """Learning-rate multiplier for a bank mixed by ``routing`` (a weight per expert), stored ``scale`` x the kernel.

    ``1 / sum r^2`` for SGD, ``1 / sum r`` for Adam-type, ``1 / (scale sum r)`` for trust-ratio optimizers.
    """
    total = float(sum(routing))
    if family == "sgd":
        return 1.0 / float(sum(r * r for r in routing))
    if family == "adam":
        return 1.0 / total
    if family == "trust":
        return 1.0 / (scale * total)
    raise ValueError(f"unknown optimizer family {family!r}; choose from {FAMILIES}")
