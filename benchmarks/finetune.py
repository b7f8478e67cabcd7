"""Fine-tuning benchmark on real data: a static ResNet-18 against its conversion to every kind, same steps.

Trains a static torchvision ResNet-18 (10 classes) from scratch on scikit-learn's
handwritten digits (1,797 real 8x8 scans upsampled to 32x32 RGB), converts it to each
kind, checks each converted model makes the same predictions, then fine-tunes the
static model and every conversion for the same number of steps (same data order) and
writes the curves to ``benchmarks/results/finetune.md``.

    python benchmarks/finetune.py [--pre-epochs 4] [--epochs 4] [--kinds condconv:4 dcd:1 ...]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import write_digits

import convert
from convert.finetune import TrainConfig, evaluate, finetune, image_folder_splits, train_model

RESULTS = Path(__file__).parent / "results" / "finetune.md"


def _history_row(h: dict) -> str:
    return f"| {h['epoch']} | {h['train_loss']:.4f} | {h['train_acc']:.4f} | {h['val_loss']:.4f} | {h['val_acc']:.4f} |"


KINDS = ("condconv:4", "dyconv:4", "dynet:4", "dcd:1", "odconv:1", "odconv:4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pre-epochs", type=int, default=4, help="static training before conversion")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs for every model")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), help="kind:experts entries")
    parser.add_argument("--lr", type=float, default=TrainConfig().lr, help="default: dynconv finetune's")
    parser.add_argument("--crop-min", type=float, default=TrainConfig().crop_min, help="dynconv finetune --crop-min")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs, after = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits(Path(tmp) / "digits", size=32)
        plain_set, val_set, classes = image_folder_splits(root, 32, 0.2, seed=0, augment=False)
        # timm's training transform, as finetune's
        train_set, _, _ = image_folder_splits(root, 32, 0.2, seed=0, crop_min=args.crop_min)
        val_loader = DataLoader(val_set, batch_size=256)

        torch.manual_seed(0)
        static = convert.build_model("resnet18", num_classes=classes)
        warm = TrainConfig(epochs=args.pre_epochs, opt="momentum", lr=0.05, sched="none", warmup_epochs=0)
        pre = train_model(static, plain_set, val_set, warm)
        static_loss, static_acc, static_pred = evaluate(static, val_loader)
        config = TrainConfig(
            epochs=args.epochs, lr=args.lr, val_fraction=0.2, temperature_epochs=args.epochs / 2, crop_min=args.crop_min
        )
        runs["static"] = train_model(copy.deepcopy(static), train_set, val_set, config, classes=classes).history
        print(f"static: {runs['static'][-1]}", flush=True)

        for entry in args.kinds:
            kind, experts = entry.split(":")
            label = f"{kind} n={experts}" if kind == "odconv" else kind
            result = convert.convert_model(static, kind=kind, experts=int(experts), input_size=32)
            loss, acc, pred = evaluate(result.model, val_loader)
            after[label] = (loss, acc, int((static_pred == pred).sum()), len(result.layers))
            checkpoint = convert.save_checkpoint(result, Path(tmp) / f"{kind}-{experts}.safetensors")
            runs[label] = finetune(checkpoint, root, Path(tmp) / f"{kind}-{experts}-tuned.safetensors", config).history
            print(f"{label}: after conversion {after[label]}, last epoch {runs[label][-1]}", flush=True)

    minutes = (time.perf_counter() - start) / 60
    lines = [
        "# Fine-tuning benchmark: static ResNet-18 against its conversion to every kind",
        "",
        f"Data: scikit-learn digits (1,797 real scans), 32x32 RGB, 80/20 split ({len(train_set)} train, "
        f"{len(val_set)} val). Static torchvision ResNet-18 (10 classes) trained from scratch for "
        f"{args.pre_epochs} epochs (SGD lr 0.05, no augmentation), then converted to each kind "
        "(CondConv, DyConv and DyNet with 4 "
        "experts; default selection: the stem and the convs whose input is 1x1 at this resolution stay static). "
        "The static model and every conversion "
        f"fine-tuned for {args.epochs} epochs with `dynconv finetune`'s defaults (timm: {config.opt}, "
        f"lr {config.lr:g}, weight decay {config.weight_decay:g} off norms and biases, cosine with a "
        f"{config.warmup_epochs:g}-epoch warm-up per step, batch {config.batch_size}, "
        f"timm's training transform with random-resized crops of {config.crop_min:g}-1 of the area, same data "
        "order); DyConv's temperature annealed 30 → 1 over the first "
        f"{args.epochs / 2:g} epochs, ODConv kept at 1. {minutes:.1f} min on {args.threads} "
        f"thread{'s' if args.threads > 1 else ''}. "
        f"Rerun: `python benchmarks/finetune.py --crop-min {config.crop_min:g} --epochs {args.epochs}`.",
        "",
        "## Right after conversion",
        "",
        "| model | converted convs | val loss | val accuracy | same prediction as static |",
        "|---|---|---|---|---|",
        f"| static | — | {static_loss:.4f} | {static_acc:.4f} | — |",
        *[
            f"| {label} | {n} | {loss:.4f} | {acc:.4f} | {same} / {len(static_pred)} |"
            for label, (loss, acc, same, n) in after.items()
        ],
        "",
        "## Static training before conversion",
        "",
        "| epoch | train loss | train acc | val loss | val acc |",
        "|---|---|---|---|---|",
        *[_history_row(h) for h in pre.history],
        "",
        "## Fine-tuning, same steps: validation accuracy (train loss) per epoch",
        "",
        "| epoch | " + " | ".join(runs) + " |",
        "|---" * (len(runs) + 1) + "|",
    ]
    for epoch in range(args.epochs):
        cells = [f"{runs[label][epoch]['val_acc']:.4f} ({runs[label][epoch]['train_loss']:.3f})" for label in runs]
        lines.append(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
