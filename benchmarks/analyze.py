"""``dynconv analyze`` on real data: speed, and what a briefly fine-tuned CondConv ResNet-18 routes.

Trains a static torchvision ResNet-18 (10 classes) for a few steps on scikit-learn's
digits at 64x64, converts it to CondConv (K=4), fine-tunes the conversion for a few
steps, then times the analysis of 1,000 images (batch 64) and writes the table to
``benchmarks/results/analyze.md`` and the figures to ``docs/analyze/``.

    python benchmarks/analyze.py [--steps 40] [--images 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import write_digits

import convert
from convert.analyze import analyze
from convert.figures import write_figures
from convert.finetune import TrainConfig, finetune, image_folder_splits, train_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "analyze.md"
FIGURES = ROOT / "docs" / "analyze"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps, static and converted")
    parser.add_argument("--images", type=int, default=1000, help="images analysed")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits(Path(tmp) / "digits", size=args.size)
        train_set, val_set, classes = image_folder_splits(root, args.size, 0.1, seed=0)
        torch.manual_seed(0)
        static = convert.build_model("resnet18", num_classes=classes)
        config = TrainConfig(epochs=1, lr=0.05, batch_size=32, max_steps_per_epoch=args.steps)
        train_model(static, train_set, val_set, config)
        result = convert.convert_model(static.eval(), kind="condconv", experts=4, input_size=args.size)
        converted = convert.save_checkpoint(result, Path(tmp) / "converted.safetensors")
        tuned = Path(tmp) / "finetuned.safetensors"
        start = time.perf_counter()
        tune = TrainConfig(epochs=1, lr=0.02, batch_size=32, max_steps_per_epoch=args.steps, router_lr_scale=10)
        state = finetune(converted, root, tuned, tune)
        tune_seconds = time.perf_counter() - start
        fresh = analyze(converted, root, limit=args.images)
        analysis = analyze(tuned, root, limit=args.images)
        args.figures.mkdir(parents=True, exist_ok=True)
        written = write_figures(analysis, args.figures)
    rate = analysis.images / analysis.seconds
    lines = [
        "# `dynconv analyze`: speed and what the routers learned",
        "",
        f"Data: scikit-learn digits (real scans) at {args.size}x{args.size}, 10 classes. A static torchvision "
        f"ResNet-18 trained for {args.steps} steps (batch 32), converted to CondConv K=4 ({len(result.layers)} "
        f"convs), fine-tuned for {args.steps} steps (lr 0.02, routers x10; {tune_seconds:.0f} s, val acc "
        f"{state.history[-1]['val_acc']:.3f}). Analysis of {analysis.images} images, batch 64, 2 CPU threads. "
        "Rerun: `python benchmarks/analyze.py`.",
        "",
        "| checkpoint | images | seconds | images/s |",
        "|---|---|---|---|",
        f"| converted | {fresh.images} | {fresh.seconds:.1f} | {fresh.images / fresh.seconds:.0f} |",
        f"| fine-tuned | {analysis.images} | {analysis.seconds:.1f} | {rate:.0f} |",
        "",
        f"Right after conversion: {fresh.summary()}.",
        "",
        f"After fine-tuning: {analysis.summary()}.",
        "",
        "| layer | entropy | top expert | class ratio | spread (x at conversion) |",
        "|---|---|---|---|---|",
    ]
    for stats in analysis.layers:
        top = max(range(stats.experts), key=lambda k: stats.top_share[k])
        lines.append(
            f"| {stats.name} | {stats.entropy:.4f} | e{top} {100 * stats.top_share[top]:.0f}% | "
            f"{stats.class_ratio:.3g} | {stats.spread:.4f} ({stats.moved:.2f}x) |"
        )
    lines += ["", "Figures: " + ", ".join(f"`docs/analyze/{p.name}`" for p in written), ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
