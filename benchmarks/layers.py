"""Per-layer cost of each kind: every converted conv timed against the conv it replaced.

Run by hand on a quiet machine (timings never gate tests):

    python benchmarks/layers.py                                  # writes results/layers.md
    python benchmarks/layers.py --models resnet18 --kinds odconv:1 --batches 16 --out /tmp/layers.md

For a torchvision model at 224x224 and each kind, every converted layer gets the input
it sees in the model (recorded by a hook) and is timed beside the original conv and
its own router, in interleaved rounds. The table groups layers by type (1x1,
depthwise, dense k x k) and map size, so a model-level miss can be read layer by
layer: which layers cost what, and how much of it is the router.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
import torchvision
from core import inference_call, module_inputs, time_rounds
from torch import nn

import convert
import dynconv

RESULTS = Path(__file__).parent / "results" / "layers.md"
SIZE = 224
DEFAULT_KINDS = ("condconv:4", "dcd:1", "odconv:1", "odconv:4")


def layer_type(conv: nn.Conv2d) -> str:
    """``1x1``, ``depthwise 3x3`` or ``3x3`` (with ``/2`` for stride 2): the group a layer is summed in."""
    k = "x".join(map(str, conv.kernel_size))
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
    stride = "" if conv.stride == (1, 1) else f" /{conv.stride[0]}"
    return ("depthwise " if depthwise else "") + k + stride


def measure(name: str, kind: str, experts: int, batches: list[int], rounds: int, budget: float) -> list[dict]:
    """One row per converted layer and batch: static conv, router and dynamic layer milliseconds."""
    torch.manual_seed(0)
    static = torchvision.models.get_model(name).eval()
    result = convert.convert_model(static, kind=kind, experts=experts, input_size=64)
    model = result.model.eval()
    inputs = module_inputs(model, dynconv.dynamic_layers(model), torch.randn(1, 3, SIZE, SIZE))
    originals = dict(static.named_modules())
    rows = []
    for layer_name, one in inputs.items():
        layer = model.get_submodule(layer_name)
        conv = originals[layer_name]
        for batch in batches:
            x = one.expand(batch, *one.shape[1:]).contiguous()
            methods = {
                "static": inference_call(conv, x),
                "router": inference_call(layer.router, x),
                "dynamic": inference_call(layer, x),
            }
            ms = time_rounds(methods, rounds, budget)
            rows.append(
                {
                    "layer": layer_name,
                    "type": layer_type(conv),
                    "map": one.shape[-1],
                    "channels": f"{conv.in_channels}→{conv.out_channels}",
                    "batch": batch,
                    **ms,
                }
            )
    return rows


def grouped_table(rows: list[dict], batch: int) -> list[str]:
    """Layers of one batch summed by type and input map size, biggest extra cost first."""
    groups: dict[tuple[str, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        if r["batch"] != batch:
            continue
        g = groups[(r["type"], r["map"])]
        g["count"] += 1
        for key in ("static", "router", "dynamic"):
            g[key] += r[key]
    lines = [
        "| layers | input map | count | static ms | dynamic ms | ratio | extra ms | of which router ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(groups.items(), key=lambda kv: kv[1]["static"] - kv[1]["dynamic"])
    for (kind, size), g in order:
        extra = g["dynamic"] - g["static"]
        lines.append(
            f"| {kind} | {size}x{size} | {g['count']:.0f} | {g['static']:.2f} | {g['dynamic']:.2f} "
            f"| {g['dynamic'] / g['static']:.2f}× | {extra:+.2f} | {g['router']:.2f} |"
        )
    total_static = sum(g["static"] for g in groups.values())
    total_dynamic = sum(g["dynamic"] for g in groups.values())
    total_router = sum(g["router"] for g in groups.values())
    lines.append(
        f"| **all converted** | | {sum(g['count'] for g in groups.values()):.0f} | {total_static:.2f} "
        f"| {total_dynamic:.2f} | {total_dynamic / total_static:.2f}× | {total_dynamic - total_static:+.2f} "
        f"| {total_router:.2f} |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--kinds", nargs="*", default=list(DEFAULT_KINDS), help="kind:experts entries")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per method per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    sections = []
    for name in args.models:
        for entry in args.kinds:
            kind, experts = entry.split(":")
            rows = measure(name, kind, int(experts), args.batches, args.rounds, args.budget)
            for batch in args.batches:
                section = [f"### {name}, {kind} n={experts}, batch {batch}", "", *grouped_table(rows, batch), ""]
                print("\n".join(section), flush=True)
                sections += section
    minutes = (time.perf_counter() - start) / 60
    header = [
        "# Per-layer cost of the dynamic kinds",
        "",
        f"torchvision models at {SIZE}x{SIZE}, random weights, eager under `torch.inference_mode`, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}. "
        "Every converted layer runs on the input it sees in the model, timed beside the conv it replaced and "
        f"its router alone (median of {args.rounds} interleaved rounds). Layers summed by type and input map; "
        "'extra' is dynamic minus static, 'router' is included in 'dynamic'. "
        f"Run time {minutes:.1f} min. Regenerate with `python benchmarks/layers.py`.",
        "",
    ]
    text = "\n".join(header + sections)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
