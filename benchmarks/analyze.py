"""``dynconv analyze`` on real data: its speed, and what a briefly fine-tuned CondConv ResNet-18 routes.

Converts a seeded torchvision ResNet-18 (10 classes) to CondConv (K=4) at 64x64, times
the analysis of ``--images`` digits (scikit-learn's real scans, upsampled to 64x64,
batch 64), fine-tunes the conversion for ``--steps`` steps (routers at 10x the learning
rate) and analyses it again; writes the table to ``benchmarks/results/analyze.md`` and
the figures to ``docs/analyze/``.

    python benchmarks/analyze.py [--steps 4] [--images 1000]
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
from convert.finetune import TrainConfig, finetune

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "analyze.md"
FIGURES = ROOT / "docs" / "analyze"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="fine-tuning steps (batch 32)")
    parser.add_argument("--images", type=int, default=1000, help="images analysed")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits(Path(tmp) / "digits", size=args.size)
        torch.manual_seed(0)
        static = convert.build_model("resnet18", num_classes=10).eval()
        result = convert.convert_model(static, kind="condconv", experts=4, input_size=args.size)
        converted = convert.save_checkpoint(result, Path(tmp) / "converted.safetensors")
        fresh = analyze(converted, root, limit=args.images)
        tuned = Path(tmp) / "finetuned.safetensors"
        tune = TrainConfig(epochs=1, lr=0.05, batch_size=32, max_steps_per_epoch=args.steps, router_lr_scale=10)
        start = time.perf_counter()
        finetune(converted, root, tuned, tune)
        tune_seconds = time.perf_counter() - start
        analysis = analyze(tuned, root, limit=args.images)
        written = write_figures(analysis, args.figures)
    lines = [
        "# `dynconv analyze`: speed and what the routers learned",
        "",
        f"Data: scikit-learn digits (real scans) at {args.size}x{args.size}, 10 classes, {fresh.images} images "
        f"analysed in batches of 64 on 2 CPU threads. A seeded torchvision ResNet-18 converted to CondConv K=4 "
        f"({len(result.layers)} convs), then fine-tuned for {args.steps} steps (batch 32, lr 0.05, routers x10; "
        f"{tune_seconds:.0f} s). Rerun: `python benchmarks/analyze.py` (`--images`, `--steps`).",
        "",
        "| checkpoint | images | seconds | images/s |",
        "|---|---|---|---|",
        f"| converted | {fresh.images} | {fresh.seconds:.1f} | {fresh.images / fresh.seconds:.1f} |",
        f"| fine-tuned | {analysis.images} | {analysis.seconds:.1f} | {analysis.images / analysis.seconds:.1f} |",
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
            f"| {stats.name} | {stats.entropy:.6f} | e{top} {100 * stats.top_share[top]:.0f}% | "
            f"{stats.class_ratio:.3g} | {stats.spread:.5f} ({stats.moved:.3f}x) |"
        )
    lines += ["", "Figures: " + ", ".join(f"`docs/analyze/{p.name}`" for p in written), ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
