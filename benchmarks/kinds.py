"""DCD and ODConv against the static model and CondConv K=4: eager forward latency, parameters, MACs.

Run by hand on a quiet machine (timings never gate tests):

    python benchmarks/kinds.py                   # writes results/kinds.md
    python benchmarks/kinds.py --models resnet18 --batches 1 --rounds 3 --out /tmp/kinds.md

For every model and batch size, every variant (static, condconv K=4, dcd, odconv n=1,
odconv n=4) is timed in the same interleaved rounds (median reported), so the ratios
are measured side by side under the same load. Conversion uses the default selection
(every conv but the stem and 1x1-input gates).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torchvision
from core import inference_call, time_rounds
from torch import nn

import convert
from convert.counting import count_macs, count_params

#: (label, kind, experts)
VARIANTS = (("condconv K=4", "condconv", 4), ("dcd", "dcd", 1), ("odconv 1x", "odconv", 1), ("odconv 4x", "odconv", 4))
RESULTS = Path(__file__).parent / "results" / "kinds.md"
#: Parameters the ODConv authors' README reports (r = 1/16): model -> (static, 1x, 4x), in millions.
ODCONV_REPORTED = {"resnet18": (11.69, 11.94, 44.90), "mobilenet_v2": (3.50, 4.94, 11.51)}
#: Where their placement differs from the default selection: ResNet-18's 1x1 downsample convs stay static.
ODCONV_PLACEMENT = {"resnet18": ["*downsample*"], "mobilenet_v2": []}
SIZE = 224


def variants(name: str) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The static model and each converted variant (eval), with whole-model parameters and MACs."""
    torch.manual_seed(0)
    static = torchvision.models.get_model(name).eval()
    models: dict[str, nn.Module] = {"static": static}
    totals: dict[str, dict] = {}
    shape = (3, SIZE, SIZE)
    totals["static"] = {"params_after": count_params(static), "macs_after": count_macs(static, shape), "converted": 0}
    for label, kind, experts in VARIANTS:  # converted at 64x64 (fast probe), counted at 224x224
        result = convert.convert_model(static, kind=kind, experts=experts, input_size=64)
        models[label] = result.model.eval()
        totals[label] = {
            "params_after": count_params(result.model),
            "macs_after": count_macs(result.model, shape),
            "converted": len(result.layers),
        }
    return models, totals


def measure(name: str, batches: list[int], rounds: int, budget: float) -> tuple[dict, dict]:
    """``{(batch, variant): ms}`` and the parameter/MAC totals of every variant."""
    models, totals = variants(name)
    times: dict[tuple[int, str], float] = {}
    for batch in batches:
        x = torch.randn(batch, 3, SIZE, SIZE)
        methods = {label: inference_call(model, x) for label, model in models.items()}
        for label, ms in time_rounds(methods, rounds, budget).items():
            times[(batch, label)] = ms
        print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.1f} ms" for (b, k), v in times.items() if b == batch))
    return times, totals


def table(name: str, times: dict, totals: dict, batches: list[int]) -> list[str]:
    labels = ["static", *(v[0] for v in VARIANTS)]
    lines = [
        f"### {name}",
        "",
        "| variant | converted convs | params | MACs | "
        + " | ".join(f"batch {b} ms | batch {b} vs static" for b in batches)
        + " |",
        "|---" * (4 + 2 * len(batches)) + "|",
    ]
    for label in labels:
        t = totals[label]
        cells = []
        for b in batches:
            ms = times[(b, label)]
            cells += [f"{ms:.1f}", f"{ms / times[(b, 'static')]:.2f}×"]
        lines.append(
            f"| {label} | {t['converted']} | {t['params_after'] / 1e6:.2f}M | {t['macs_after'] / 1e6:.0f}M | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, ""]


def odconv_placement() -> list[str]:
    """Our ODConv parameter counts beside the authors', with the default selection and with theirs."""
    lines = [
        "### ODConv parameters against the authors' README",
        "",
        "| model | selection | static | ODConv 1x | ODConv 4x | authors: static / 1x / 4x |",
        "|---|---|---|---|---|---|",
    ]
    for name, reported in ODCONV_REPORTED.items():
        placements = {"default": []}
        if ODCONV_PLACEMENT[name]:
            placements["exclude " + ", ".join(f"`{p}`" for p in ODCONV_PLACEMENT[name])] = ODCONV_PLACEMENT[name]
        for label, exclude in placements.items():
            torch.manual_seed(0)
            static = torchvision.models.get_model(name)
            counts = [
                count_params(
                    convert.convert_model(static, kind="odconv", experts=n, exclude=exclude, input_size=64).model
                )
                for n in (1, 4)
            ]
            lines.append(
                f"| {name} | {label} | {count_params(static) / 1e6:.2f}M | {counts[0] / 1e6:.2f}M "
                f"| {counts[1] / 1e6:.2f}M | {' / '.join(f'{r:.2f}M' for r in reported)} |"
            )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.25, help="seconds per method per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    sections = []
    for name in args.models:
        times, totals = measure(name, args.batches, args.rounds, args.budget)
        sections += table(name, times, totals, args.batches)
    sections += odconv_placement()
    minutes = (time.perf_counter() - start) / 60
    header = [
        "# DCD and ODConv: speed, parameters, MACs",
        "",
        f"torchvision models at {SIZE}x{SIZE}, random weights, eager forward under `torch.inference_mode`, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}; "
        f"median of {args.rounds} interleaved rounds (all variants of a model and batch side by side). "
        "Default selection (stem and 1x1-input gates stay static). MACs at batch 1. "
        f"Run time {minutes:.1f} min. Regenerate with `python benchmarks/kinds.py`.",
        "",
    ]
    text = "\n".join(header + sections)
    print(text)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
