"""Benchmark the dynamic-conv core against a static conv, a per-sample loop and timm.

Run by hand (the machine is shared; timings never gate tests):

    python benchmarks/core.py                     # writes benchmarks/results/core.md
    python benchmarks/core.py --quick             # fewer repeats, prints only

Every method of a row is timed in the same rounds, interleaved, and the median of
the rounds is reported, so ratios are measured side by side under the same load.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import CondConv2d as TimmCondConv2d

from convert.collapse import module_inputs  # noqa: F401 - re-exported: models.py and layers.py use it
from dynconv.core import select_strategy
from dynconv.core.rules import applicable
from dynconv.functional import dynamic_conv2d
from dynconv.geometry import ConvGeometry

EXPERTS = 4
RESULTS = Path(__file__).parent / "results" / "core.md"


@dataclass(frozen=True)
class Shape:
    name: str
    c_in: int
    c_out: int
    kernel: int
    size: int
    groups: int = 1

    @property
    def padding(self) -> int:
        return self.kernel // 2


SHAPES = [
    Shape("resnet18 layer1 3x3 64ch 56²", 64, 64, 3, 56),
    Shape("resnet18 layer3 3x3 256ch 14²", 256, 256, 3, 14),
    Shape("resnet18 layer4 3x3 512ch 7²", 512, 512, 3, 7),
    Shape("mbv2 pointwise 24→144 56²", 24, 144, 1, 56),
    Shape("mbv2 depthwise 3x3 144ch 56²", 144, 144, 3, 56, groups=144),
    Shape("mbv2 pointwise 960→160 7²", 960, 160, 1, 7),
]
BASELINE_STRATEGIES = ("grouped", "loop", "unfold")
ALL_STRATEGIES = ("single", "grouped", "loop", "unfold", "matmul", "output")


def inference_call(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], None]:
    """One timed call: ``fn(x)`` under ``torch.inference_mode`` (a model, a layer or a router)."""

    def run() -> None:
        with torch.inference_mode():
            fn(x)

    return run


def time_rounds(methods: dict[str, Callable[[], None]], rounds: int, budget: float) -> dict[str, float]:
    """Median milliseconds per call of each method, methods interleaved within every round."""
    iters = {}
    for name, fn in methods.items():
        fn()  # warm-up (allocations, oneDNN primitive caches)
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        iters[name] = max(1, min(50, int(budget / max(once, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            samples[name].append((time.perf_counter() - start) * 1e3 / iters[name])
    return {name: statistics.median(vals) for name, vals in samples.items()}


def build_methods(shape: Shape, batch: int, backward: bool) -> tuple[dict[str, Callable[[], None]], str]:
    """Closures computing one forward (and backward) of each method on the same data."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, shape.c_in, shape.size, shape.size, generator=gen)
    k = shape.kernel
    w_static = torch.randn(shape.c_out, shape.c_in // shape.groups, k, k, generator=gen) * 0.05
    experts = torch.randn(EXPERTS, *w_static.shape, generator=gen) * 0.05
    routing = torch.rand(batch, EXPERTS, generator=gen)
    geom = ConvGeometry.build((k, k), 1, shape.padding, 1, shape.groups)
    timm_conv = TimmCondConv2d(
        shape.c_in, shape.c_out, k, padding=shape.padding, groups=shape.groups, num_experts=EXPERTS
    )
    with torch.no_grad():
        timm_conv.weight.copy_(experts.reshape(EXPERTS, -1))
    if backward:
        for t in (x, w_static, experts, routing):
            t.requires_grad_(True)

    def run(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        if not backward:

            def forward_only() -> None:
                with torch.no_grad():
                    fn()

            return forward_only

        def forward_backward() -> None:
            fn().sum().backward()

        return forward_backward

    methods: dict[str, Callable[[], None]] = {
        "static": run(lambda: F.conv2d(x, w_static, None, 1, shape.padding, 1, shape.groups)),
        "dynconv": run(lambda: dynamic_conv2d(x, experts, routing, None, 1, shape.padding, 1, shape.groups)),
        "timm": run(lambda: timm_conv(x, routing)),
    }
    for name in ALL_STRATEGIES:
        if applicable(name, batch, geom):
            methods[name] = run(
                lambda name=name: dynamic_conv2d(
                    x, experts, routing, None, 1, shape.padding, 1, shape.groups, strategy=name
                )
            )
    with torch.set_grad_enabled(backward):
        chosen = select_strategy(x, experts, geom, backward)
    return methods, chosen


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; print, do not write results")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    budget = 0.1 if args.quick else 0.25

    rows, detail = [], []
    speedups_b32 = []
    for shape in SHAPES:
        for batch in (1, 32):
            for backward in (False, True):
                methods, chosen = build_methods(shape, batch, backward)
                ms = time_rounds(methods, rounds, budget)
                best_base = min(ms[n] for n in BASELINE_STRATEGIES)
                pass_name = "fwd+bwd" if backward else "fwd"
                row = (
                    f"| {shape.name} | {batch} | {pass_name} | {ms['static']:.2f} | {ms['dynconv']:.2f} "
                    f"| {chosen} | {ms['dynconv'] / ms['static']:.2f}× | {ms['loop'] / ms['dynconv']:.2f}× "
                    f"| {ms['timm'] / ms['dynconv']:.2f}× | {best_base / ms['dynconv']:.2f}× |"
                )
                rows.append(row)
                print(row, flush=True)
                strat_cells = " | ".join(f"{ms[n]:.2f}" if n in ms else "—" for n in ALL_STRATEGIES)
                detail.append(f"| {shape.name} | {batch} | {pass_name} | {ms['timm']:.2f} | {strat_cells} |")
                print(detail[-1], flush=True)
                if batch == 32:
                    speedups_b32.append(ms["timm"] / ms["dynconv"])

    summary = f"Geomean speed-up over timm CondConv2d at batch 32 (12 rows): **{geomean(speedups_b32):.2f}×**"
    print(summary)
    if args.quick:
        return
    header = (
        "| shape | batch | pass | static ms | dynconv ms | strategy | dynconv / static | loop / dynconv "
        "| timm / dynconv | best(grouped,loop,unfold) / dynconv |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    detail_header = (
        "| shape | batch | pass | timm | " + " | ".join(ALL_STRATEGIES) + " |\n|" + "---|" * (4 + len(ALL_STRATEGIES))
    )
    text = "\n".join(
        [
            "# Core benchmark: dynamic_conv2d",
            "",
            f"K={EXPERTS} experts, float32, {args.threads} threads, torch {torch.__version__}, timm {timm.__version__},"
            f" {platform.processor() or platform.machine()}. Median of {rounds} interleaved rounds.",
            "Ratios above 1× in the last three columns mean dynconv is faster.",
            "Regenerate with `python benchmarks/core.py`.",
            "",
            summary,
            "",
            header,
            *rows,
            "",
            "## Every strategy (ms)",
            "",
            detail_header,
            *detail,
            "",
        ]
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
