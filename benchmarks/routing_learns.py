"""Does routing become input-dependent when a converted model is fine-tuned? A few seconds per kind.

A seeded small CNN is trained briefly on scikit-learn's digits (8x8 real scans), converted,
and fine-tuned for ``--steps`` SGD steps (momentum 0.9) with :func:`dynconv.parameter_groups`;
``dynconv analyze``'s metrics (mean normalised routing entropy, between-class ratio) are
compared before and after, for the old initialisation (noise 0.01, routers at the base
learning rate), the defaults, and the defaults with :func:`dynconv.calibrate_routing`.

    python benchmarks/routing_learns.py [--steps 40] [--kinds dynet,condconv,dyconv,odconv]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import convert
import dynconv
from convert.analyze import _Accumulator

CLASSES = 10


def digits() -> tuple[Tensor, Tensor]:
    """The 1,797 digits as ``[N, 3, 8, 8]`` in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images.expand(-1, 3, -1, -1).contiguous(), torch.tensor(data.target)


def small_cnn() -> nn.Module:
    """A seeded four-conv CNN (3x3, strided 3x3, 3x3, 1x1) for 8x8 inputs."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for c_in, c_out, kernel, stride in ((3, 16, 3, 1), (16, 32, 3, 2), (32, 32, 3, 1), (32, 32, 1, 1)):
        layers += [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))


def train(model: nn.Module, images: Tensor, labels: Tensor, steps: int, groups: list[dict]) -> float:
    """``steps`` SGD steps (momentum 0.9, batch 32, seeded order) on ``groups``; the last loss."""
    optimizer = torch.optim.SGD(groups, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        batch = torch.randint(0, len(images), (32,), generator=order)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def routing_metrics(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[float, float]:
    """``dynconv analyze``'s mean routing entropy (1 = uniform) and mean between-class ratio over the layers."""
    model.eval()
    with torch.no_grad(), dynconv.capture_routing(model) as routing:
        model(images)
    entropies, ratios = [], []
    for name, layer in dynconv.dynamic_layers(model).items():
        weights = layer.expert_weights(routing[name])  # ODConv and DCD record more than the expert weights
        sums = _Accumulator(layer.experts, CLASSES)
        sums.add(weights, labels)
        entropies.append(sums.entropy / sums.count)
        ratios.append(sums.class_statistics(weights.dim() == 3)[0] or 0.0)
    return sum(entropies) / len(entropies), sum(ratios) / len(ratios)


def pretrained(images: Tensor, labels: Tensor, steps: int = 15) -> nn.Module:
    """The static CNN after ``steps`` steps: still far from fitting, so fine-tuning has something to learn."""
    model = small_cnn()
    train(model, images, labels, steps, [{"params": list(model.parameters()), "lr": 0.05}])
    return model


INITS = {
    "old": "main before #22 (noise 0.01, routers x1)",
    "default": "default (noise 0.1, kind's router multiplier)",
    "calibrated": "default + dynconv.calibrate_routing (256 images)",
}


def fine_tune(static: nn.Module, kind: str, images: Tensor, labels: Tensor, steps: int, *, init: str) -> dict:
    """Convert ``static`` to ``kind`` (4 experts) with ``init`` (:data:`INITS`), fine-tune; routing
    metrics before and after, the loss, and the largest logit change the initialisation made."""
    noise = 0.01 if init == "old" else None
    model = convert.convert_model(static, kind=kind, experts=4, input_size=8, seed=0, noise=noise).model
    if init == "calibrated":
        dynconv.calibrate_routing(model, [images[:128], images[128:256]])
    static.eval(), model.eval()
    with torch.no_grad():
        moved = float((static(images[:256]) - model(images[:256])).abs().max())
    before = routing_metrics(model, images, labels)
    router_lr_scale = 1.0 if init == "old" else None  # the old routers: the base learning rate
    groups = dynconv.parameter_groups(model, router_lr_scale, lr=0.02, optimizer="sgd")
    loss = train(model, images, labels, steps, groups)
    after = routing_metrics(model, images, labels)
    return {
        "entropy": before[0],
        "ratio": before[1],
        "entropy_after": after[0],
        "ratio_after": after[1],
        "loss": loss,
        "max_logit_change": moved,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kinds", default="dynet,condconv,dyconv,odconv")
    args = parser.parse_args()
    images, labels = digits()
    static = pretrained(images, labels)
    print("| kind | init | entropy before -> after | 1 - entropy after | class ratio before -> after | loss |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        for init, label in INITS.items():
            m = fine_tune(static, kind, images, labels, args.steps, init=init)
            print(
                f"| {kind} | {label} | {m['entropy']:.6f} -> {m['entropy_after']:.6f} | "
                f"{1 - m['entropy_after']:.2e} | {m['ratio']:.3g} -> {m['ratio_after']:.3g} | {m['loss']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
