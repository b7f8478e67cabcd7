"""Does a balancing term stop calibrated softmax routers collapsing onto one expert? Digits, a minute.

``routing_learns.py`` shows calibrated DyConv and ODConv routing collapse within 40 SGD steps:
every image goes to one expert (entropy 0, between-class ratio 0). This adds a term to the loss
and fine-tunes the same way on five 597-image slices of the digits:

- ``importance``: Shazeer et al.'s (2017) importance loss, per layer the squared coefficient
  of variation of each expert's total routing over the batch (0 when every expert gets the
  same share), averaged over the layers;
- ``kl``: the mean KL divergence of each image's routing from uniform (against saturation).

Results (mean entropy after, between-class ratio after, per slice) go to
``benchmarks/results/routing_balance.md``.

    python benchmarks/routing_balance.py [--kinds dyconv,odconv]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routing_learns
from routing_learns import digits, fine_tune, pretrained

import dynconv

RESULTS = Path(__file__).parent / "results" / "routing_balance.md"
SLICES = (0, 300, 600, 900, 1200)
SLICE = 597
#: (term, weight) arms; weight 0 is calibrated routing without a term.
ARMS = (("none", 0.0), ("importance", 0.1), ("importance", 1.0), ("kl", 0.01), ("kl", 0.1))


def expert_routing(router: nn.Module, output: object) -> Tensor | None:
    """The weights over the experts in a router's output, ``[B, K]`` (DyNet's ``[B, K, C]`` averaged over C)."""
    if isinstance(output, tuple):  # ODConv: (kernel attention, filter, channel, spatial)
        output = output[0]
    return output.mean(-1) if output.dim() == 3 else output


def term(kind: str, routing: list[Tensor]) -> Tensor:
    """The balancing term over the layers' routing of one batch."""
    values = []
    for weights in routing:
        if kind == "importance":
            importance = weights.float().sum(0)
            values.append(importance.var(unbiased=False) / importance.mean().square().clamp_min(1e-12))
        else:
            w = weights.float().clamp_min(1e-9)
            values.append((w * w.log()).sum(1).mean() + math.log(w.shape[1]))
    return torch.stack(values).mean()


def balanced_train(kind: str, weight: float):
    """``routing_learns.train`` with ``weight`` times the ``kind`` term added to each step's loss."""

    def train(model: nn.Module, images: Tensor, labels: Tensor, steps: int, groups: list[dict]) -> float:
        optimizer = torch.optim.SGD(groups, momentum=0.9)
        order = torch.Generator().manual_seed(0)
        routing: list[Tensor] = []
        routers = {id(layer.router): layer.router for layer in dynconv.dynamic_layers(model).values()}
        hooks = [
            r.register_forward_hook(lambda m, _a, out: routing.append(expert_routing(m, out))) for r in routers.values()
        ]
        model.train()
        loss = torch.zeros(())
        try:
            for _ in range(steps):
                batch = torch.randint(0, len(images), (32,), generator=order)
                routing.clear()
                loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                total = loss + weight * term(kind, routing) if weight else loss
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
        finally:
            for hook in hooks:
                hook.remove()
        return loss.item()

    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="dyconv,odconv")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    images, labels = digits()
    static = pretrained(images, labels).eval()
    plain_train = routing_learns.train
    lines = [
        f"# Balancing terms against the collapse of calibrated softmax routing (digits, {args.steps} SGD steps)",
        "",
        "`python benchmarks/routing_balance.py`: the small CNN of `routing_learns.py`, converted (K=4), "
        "`dynconv.calibrate_routing`, then fine-tuned as there (SGD momentum 0.9, lr 0.02, `parameter_groups`: "
        f"softmax routers at 30x) on five {SLICE}-image slices of the digits, with a term added to the loss. "
        "Each cell: mean routing entropy after (1 = uniform) / between-class ratio after, one per slice.",
        "",
        "| kind | term | weight | "
        + " | ".join(f"slice {s}" for s in SLICES)
        + " | collapsed (entropy < 0.01, ratio < 0.5) |",
        "|---|---|---|" + "---|" * len(SLICES) + "---|",
    ]
    try:
        for kind in args.kinds.split(","):
            for name, weight in ARMS:
                routing_learns.train = balanced_train(name, weight)
                cells, collapsed = [], 0
                for start in SLICES:
                    part = slice(start, start + SLICE)
                    m = fine_tune(static, kind, images[part], labels[part], args.steps, init="calibrated")
                    cells.append(f"{m['entropy_after']:.3f} / {m['ratio_after']:.2f}")
                    collapsed += m["entropy_after"] < 0.01 and m["ratio_after"] < 0.5
                lines.append(
                    f"| {kind} | {name} | {weight} | " + " | ".join(cells) + f" | {collapsed} of {len(SLICES)} |"
                )
                print(lines[-1], flush=True)
    finally:
        routing_learns.train = plain_train
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
