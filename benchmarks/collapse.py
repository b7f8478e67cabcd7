"""Does collapsing pay? A fine-tuned dynamic ResNet-18 on digits, collapsed within 0.2 accuracy points.

Trains a static torchvision ResNet-18 (10 classes) briefly on scikit-learn's digits
(32x32 RGB), converts it (DyConv K=4 by default), fine-tunes it briefly, then runs
``convert.collapse(..., max_drop=0.2)`` over the held-out split and reports the layers
kept, the accuracy, and the ONNX Runtime batch-1 time of the static, the uncollapsed
and the collapsed model, timed side by side in the same interleaved rounds. Results go
to ``benchmarks/results/collapse.md``.

    python benchmarks/collapse.py [--kind dyconv --experts 4 --pre-epochs 3 --epochs 2]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import time_rounds
from deploy import session
from digits import write_digits

import convert
from convert.finetune import TrainConfig, evaluate, finetune, image_folder_splits, train_model

RESULTS = Path(__file__).parent / "results" / "collapse.md"
SIZE = 32


def ort_ms(models: dict[str, torch.nn.Module], folder: Path, rounds: int, size: int = SIZE) -> dict[str, float]:
    """Median ms per batch-1 run in ONNX Runtime (BatchNorm folded), the models interleaved in every round."""
    feed = {"input": torch.randn(1, 3, size, size).numpy()}
    sessions: dict[str, ort.InferenceSession] = {}
    for name, model in models.items():
        path = folder / f"{name}.onnx"
        convert.export_onnx(model, path, batch=1, input_shape=(3, size, size), fold_bn=True, overwrite=True)
        sessions[name] = session(path)
    calls = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed["input"]})) for name, s in sessions.items()}
    return time_rounds(calls, rounds, 0.4)


def model_row(name: str, dynamic: int, accuracies: list[float], ms: dict[str, float]) -> str:
    """One model's row: its dynamic layers, accuracies, ORT ms and ratios to the static and uncollapsed models."""
    cells = "".join(f" {100 * a:.2f}% |" for a in accuracies)
    return (
        f"| {name} | {dynamic} |{cells} {ms[name]:.3f} | {ms[name] / ms['static']:.2f}x | "
        f"{ms[name] / ms['uncollapsed']:.2f}x |"
    )


def plan_table(collapsed: convert.CollapseResult) -> list[str]:
    """The "## Plan" section: per layer, its routing spread, the drop its collapse causes, and the decision."""
    header = "| layer | routing spread | accuracy drop alone | cumulative | saves (ms) | decision |"
    lines = ["", "## Plan", "", header, "|---|---|---|---|---|---|"]
    for p in collapsed.layers:
        decision = "collapsed" if p.collapsed else f"kept ({p.reason})"
        cumulative = "—" if p.cumulative is None else f"{p.cumulative:.3g}"
        saved = "—" if p.saved_ms is None else f"{p.saved_ms:.3f}"
        error = "—" if p.error is None else f"{p.error:.3g}"
        lines.append(f"| {p.name} | {p.spread:.3g} | {error} | {cumulative} | {saved} | {decision} |")
    return [*lines, "", collapsed.summary(), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="dyconv")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--pre-epochs", type=int, default=3, help="static training before conversion")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of the converted model")
    parser.add_argument("--max-steps", type=int, default=None, help="cap fine-tuning steps per epoch")
    parser.add_argument("--val-images", type=int, default=None, help="collapse and score on the first N val images")
    parser.add_argument("--max-drop", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits(Path(tmp) / "digits", size=SIZE)
        train_set, val_set, classes = image_folder_splits(root, SIZE, 0.2, seed=0)
        if args.val_images is not None:
            val_set = Subset(val_set, range(min(args.val_images, len(val_set))))
        val_loader = DataLoader(val_set, batch_size=128)
        torch.manual_seed(0)
        static = convert.build_model("resnet18", num_classes=classes)
        train_model(static, train_set, val_set, TrainConfig(epochs=args.pre_epochs, lr=0.05, val_fraction=0.2))
        static_acc = evaluate(static, val_loader)[1]
        print(f"static: {static_acc:.4f}", flush=True)
        result = convert.convert_model(static, kind=args.kind, experts=args.experts, input_size=SIZE)
        checkpoint = convert.save_checkpoint(result, Path(tmp) / "converted.safetensors")
        config = TrainConfig(
            epochs=args.epochs,
            lr=0.01,
            val_fraction=0.2,
            temperature_epochs=args.epochs / 2,
            max_steps_per_epoch=args.max_steps,
        )
        finetune(checkpoint, root, Path(tmp) / "tuned.safetensors", config)
        tuned = convert.load_checkpoint(Path(tmp) / "tuned.safetensors")
        print("fine-tuned", flush=True)
        collapsed = convert.collapse(tuned, val_loader, max_drop=args.max_drop, progress=print)
        accuracy = {
            "static": static_acc,
            "uncollapsed": evaluate(tuned, val_loader)[1],
            "collapsed": evaluate(collapsed.model, val_loader)[1],
        }
        models = {"static": copy.deepcopy(static).eval(), "uncollapsed": tuned, "collapsed": collapsed.model}
        ms = ort_ms(models, Path(tmp), args.rounds)
    minutes = (time.perf_counter() - start) / 60
    dynamic = len(collapsed.layers)
    lines = [
        "# Collapse: a fine-tuned dynamic ResNet-18 back to static layers within 0.2 accuracy points",
        "",
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.machine()}, {args.threads} threads; "
        f"run took {minutes:.1f} min. Data: scikit-learn digits, 32x32 RGB, 80/20 split ({len(train_set)} train, "
        f"{len(val_set)} val). Static ResNet-18 trained {args.pre_epochs} epochs, converted to {args.kind} "
        f"K={args.experts} ({dynamic} layers), fine-tuned {args.epochs} epoch(s)"
        + ("" if args.max_steps is None else f" of at most {args.max_steps} steps")
        + ", then "
        f"`convert.collapse(max_drop={args.max_drop})` over the val split (the accuracies below are on it too). "
        "ONNX Runtime at batch 1 (BatchNorm folded), the three models timed in the same interleaved rounds "
        f"(median of {args.rounds}).",
        "",
        f"**{len(collapsed.collapsed)} of {dynamic} layers collapsed, {len(collapsed.kept)} kept**: "
        + (", ".join(collapsed.kept) or "none"),
        "",
        "| model | dynamic layers | val accuracy | ORT ms (batch 1) | vs static | vs uncollapsed |",
        "|---|---|---|---|---|---|",
    ]
    counts = {"static": 0, "uncollapsed": dynamic, "collapsed": len(collapsed.kept)}
    for name in ("static", "uncollapsed", "collapsed"):
        lines.append(model_row(name, counts[name], [accuracy[name]], ms))
    lines += plan_table(collapsed)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
