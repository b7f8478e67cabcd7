"""Collapse on the "does it pay?" model: Fashion-MNIST CondConv (calibrated routing), within 0.2 points.

Builds the same arm as ``pays.py final`` picked on validation at 20k training images
(MobileNetV3-Small at 48 px from the cached 8-epoch base; CondConv K=4 with routing
calibrated on 4 batches; 2 epochs of the project's AdamW defaults, seed 0), trains the
static model the same 2 epochs beside it, then runs ``convert.collapse(..., max_drop=0.2)``
over the validation split. Reports layers kept, validation and test accuracy, and ONNX
Runtime batch-1 time of static, uncollapsed and collapsed, timed in the same
interleaved rounds. Results go to ``benchmarks/results/collapse-fashion.md``.

    python benchmarks/collapse_fashion.py [--train-size 20000 --max-drop 0.2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collapse import model_row, ort_ms, plan_table
from fashion import Split, as_input
from pays import Bench
from pays import parse_args as pays_args
from pays_loop import Settings, accuracy, train

import convert

RESULTS = Path(__file__).parent / "results" / "collapse-fashion.md"


def labelled_batches(split: Split, size: int = 500) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``split`` as ``(images, labels)`` batches in the order it is stored."""
    return [(as_input(split.images[i : i + size]), split.labels[i : i + size]) for i in range(0, len(split), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--kind", default="condconv")
    parser.add_argument("--calibrate", type=int, default=4, help="calibration batches (0: uniform routing)")
    parser.add_argument("--max-drop", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bench = Bench(pays_args(["final", "--train-size", str(args.train_size), "--threads", str(args.threads)]))
    settings = Settings(calibrate=args.calibrate)
    steps = bench.steps(settings)
    static, _ = bench.model_for("static", Settings(), seed=0)
    train(static, bench.splits["train"], Settings(), seed=0, steps=steps)
    tuned, diff = bench.model_for(args.kind, settings, seed=0)
    train(tuned, bench.splits["train"], settings, seed=0, steps=steps)
    tuned.eval()
    print(f"trained; conversion max logit difference {diff:.2e}", flush=True)
    result = convert.collapse(tuned, labelled_batches(bench.splits["val"]), max_drop=args.max_drop, progress=print)
    models = {"static": static.eval(), "uncollapsed": tuned, "collapsed": result.model.eval()}
    scores = {n: {s: accuracy(m, bench.splits[s]) for s in ("val", "test")} for n, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        ms = ort_ms(models, Path(tmp), args.rounds, size=bench.args.size)
    minutes = (time.perf_counter() - start) / 60
    counts = {"static": 0, "uncollapsed": len(result.layers), "collapsed": len(result.kept)}
    lines = [
        f'# Collapse on the Fashion-MNIST "does it pay?" model ({args.kind}), within {args.max_drop} points',
        "",
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.machine()}, {args.threads} thread(s) "
        f"for training, 2 for ONNX Runtime; run took {minutes:.1f} min. {bench.setup['model']} at "
        f"{bench.setup['size']} px, {bench.setup['train']} training images, from the cached base (8 epochs, "
        f"test {100 * bench.base_info['test_acc']:.2f}%). Static and {args.kind} (routing calibrated on "
        f"{args.calibrate} batches) each trained 2 more epochs with the project's AdamW defaults, seed 0. "
        f"`convert.collapse(max_drop={args.max_drop})` chose on the {bench.setup['val']}-image validation "
        f"split; the test split ({bench.setup['test']} images) was not seen by it. ONNX Runtime at batch 1 "
        f"(BatchNorm folded), the three models timed in the same interleaved rounds (median of {args.rounds}).",
        "",
        f"**{len(result.collapsed)} of {len(result.layers)} layers collapsed, {len(result.kept)} kept**: "
        + (", ".join(result.kept) or "none"),
        "",
        "| model | dynamic layers | val accuracy | test accuracy | ORT ms (batch 1) | vs static | vs uncollapsed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in models:
        lines.append(model_row(name, counts[name], [scores[name]["val"], scores[name]["test"]], ms))
    lines += plan_table(result)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
