"""Whole-model forward latency: static vs converted (each kind, K=4), eager and compiled.

Run by hand on a quiet machine (timings never gate tests):

    python benchmarks/models.py            # writes results/models.md and results/compile.md
    python benchmarks/models.py --quick    # resnet18 only, fewer rounds, prints only

For every model and batch size, all variants (static, condconv, dyconv, dynet; eager
contiguous, eager channels_last, torch.compile) are timed in the same interleaved
rounds (median reported), so ratios are measured side by side under the same load.
A per-layer breakdown times each converted conv against its original on the input
it sees inside the model, to say which layers cost the difference.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from core import inference_call, module_inputs, time_rounds
from torch import nn

import convert
import dynconv
from dynconv.core import select_strategy

MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0")
KINDS = tuple(dynconv.LAYERS)
BATCHES = (1, 16)
EXPERTS = 4
SIZE = 224
RESULTS = Path(__file__).parent / "results"
TARGETS = {"resnet18": 1.5, "mobilenet_v2": 1.2}


def variants(name: str) -> dict[str, nn.Module]:
    """The static model and one converted model per kind, all in eval mode."""
    torch.manual_seed(0)
    static = torchvision.models.get_model(name).eval()
    out = {"static": static}
    for kind in KINDS:
        out[kind] = convert.convert_model(static, kind=kind, experts=EXPERTS, input_size=64).model.eval()
    return out


def measure_model(
    name: str, models: dict[str, nn.Module], rounds: int, budget: float, compile_: bool
) -> dict[tuple[int, str, str], float]:
    """``(batch, variant, mode) -> ms``; mode is eager, channels_last or compiled."""
    results: dict[tuple[int, str, str], float] = {}
    for batch in BATCHES:
        x = torch.randn(batch, 3, SIZE, SIZE)
        x_last = x.contiguous(memory_format=torch.channels_last)
        methods: dict[str, Callable[[], None]] = {}
        for variant, model in models.items():
            methods[f"{variant}|eager"] = inference_call(model, x)
            last = copy.deepcopy(model).to(memory_format=torch.channels_last)
            methods[f"{variant}|channels_last"] = inference_call(last, x_last)
            if compile_:
                start = time.perf_counter()
                compiled = torch.compile(model, dynamic=False)
                inference_call(compiled, x)()  # compile now, outside the timed rounds
                print(f"  compiled {name} {variant} batch {batch} in {time.perf_counter() - start:.0f} s", flush=True)
                methods[f"{variant}|compiled"] = inference_call(compiled, x)
        for key, ms in time_rounds(methods, rounds, budget).items():
            variant, mode = key.split("|")
            results[(batch, variant, mode)] = ms
        print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in results.items() if k[0] == batch))
    return results


def layer_breakdown(models: dict[str, nn.Module], kind: str, batch: int, rounds: int) -> list[dict]:
    """Each converted conv vs its original, on the input it sees in the model: ms and strategy."""
    static, dynamic = models["static"], models[kind]
    layers = dynconv.dynamic_layers(dynamic)
    inputs = module_inputs(static, layers, torch.randn(batch, 3, SIZE, SIZE))
    rows = []
    for layer_name, layer in layers.items():
        conv = static.get_submodule(layer_name)
        x = inputs[layer_name]
        ms = time_rounds({"static": inference_call(conv, x), "dynamic": inference_call(layer, x)}, rounds, 0.02)
        geom = layer._geometry
        rows.append(
            {
                "layer": layer_name,
                "shape": f"{conv.in_channels}→{conv.out_channels} {conv.kernel_size[0]}x{conv.kernel_size[1]}"
                + (f" g{conv.groups}" if conv.groups > 1 else "")
                + f" {x.shape[-2]}²",
                "strategy": select_strategy(x, layer.weight, geom, needs_grad=False),
                "static": ms["static"],
                "dynamic": ms["dynamic"],
            }
        )
    return rows


def table(name: str, res: dict[tuple[int, str, str], float], modes: list[str]) -> list[str]:
    lines = [f"### {name}", "", "| batch | variant | " + " | ".join(f"{m} ms" for m in modes) + " | eager vs static |"]
    lines.append("|---" * (len(modes) + 3) + "|")
    for batch in BATCHES:
        base = res[(batch, "static", "eager")]
        for variant in ("static", *KINDS):
            cells = " | ".join(f"{res[(batch, variant, m)]:.1f}" for m in modes)
            lines.append(f"| {batch} | {variant} | {cells} | {res[(batch, variant, 'eager')] / base:.2f}× |")
    return [*lines, ""]


def breakdown_table(name: str, kind: str, rows: list[dict], top: int = 8) -> list[str]:
    total_static = sum(r["static"] for r in rows)
    total_dynamic = sum(r["dynamic"] for r in rows)
    by_strategy: dict[str, float] = {}
    for r in rows:
        by_strategy[r["strategy"]] = by_strategy.get(r["strategy"], 0.0) + r["dynamic"] - r["static"]
    lines = [
        f"#### {name} {kind}, batch {BATCHES[-1]}: per-layer cost",
        "",
        f"Converted convs alone: {total_dynamic:.1f} ms vs {total_static:.1f} ms static "
        f"(+{total_dynamic - total_static:.1f} ms). Added time by core strategy: "
        + ", ".join(f"{s} +{v:.1f} ms" for s, v in sorted(by_strategy.items(), key=lambda kv: -kv[1]))
        + ".",
        "",
        "| layer | conv | strategy | static ms | dynamic ms | added ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["static"] - r["dynamic"])[:top]:
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['strategy']} | {r['static']:.2f} | {r['dynamic']:.2f} "
            f"| {r['dynamic'] - r['static']:+.2f} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 only, fewer rounds, print only")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes minutes)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = ("resnet18",) if args.quick else MODELS
    rounds, budget = (3, 0.3) if args.quick else (7, 1.0)
    start = time.perf_counter()
    built = {n: variants(n) for n in names}  # converted once, measured whole and per layer
    results = {n: measure_model(n, built[n], rounds, budget, not args.no_compile) for n in names}
    breakdowns = {
        (n, k): layer_breakdown(built[n], k, BATCHES[-1], rounds) for n in names if n in TARGETS for k in KINDS
    }
    elapsed = time.perf_counter() - start
    modes = ["eager", "channels_last"] + ([] if args.no_compile else ["compiled"])
    env = (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {SIZE}x{SIZE} input, K={EXPERTS}, forward under inference_mode, "
        f"median of {rounds} interleaved rounds; run took {elapsed / 60:.1f} min"
    )
    models_md = ["# Whole-model latency", "", env, "", *summary(results), ""]
    for n in names:
        models_md += table(n, results[n], modes)
    models_md += ["## Where the converted models spend the extra time", ""]
    for (n, k), rows in breakdowns.items():
        models_md += breakdown_table(n, k, rows)
    deploy_md = ["# Deployment: torch.compile and channels_last", "", env, "", *deploy_summary(results, modes), ""]
    text_models, text_deploy = "\n".join(models_md) + "\n", "\n".join(deploy_md) + "\n"
    print(text_models)
    print(text_deploy)
    if not args.quick:
        (RESULTS / "models.md").write_text(text_models)
        (RESULTS / "compile.md").write_text(text_deploy)
        print(f"wrote {RESULTS / 'models.md'} and {RESULTS / 'compile.md'}")


def summary(results: dict[str, dict]) -> list[str]:
    """Converted / static at the largest batch, eager, against the targets."""
    batch = BATCHES[-1]
    lines = [
        f"## Converted / static at batch {batch}, eager",
        "",
        "| model | " + " | ".join(KINDS) + " | target |",
        "|---" * (len(KINDS) + 2) + "|",
    ]
    for n, res in results.items():
        base = res[(batch, "static", "eager")]
        ratios = [res[(batch, k, "eager")] / base for k in KINDS]
        target = TARGETS.get(n)
        cells = " | ".join(f"{r:.2f}×" + ("" if target is None else (" ✓" if r <= target else " ✗")) for r in ratios)
        lines.append(f"| {n} | {cells} | {'—' if target is None else f'≤ {target}×'} |")
    return lines


def deploy_summary(results: dict[str, dict], modes: list[str]) -> list[str]:
    lines = [
        "| model | batch | variant | eager ms | channels_last / eager | compiled / eager |",
        "|---|---|---|---|---|---|",
    ]
    for n, res in results.items():
        for batch in BATCHES:
            for variant in ("static", *KINDS):
                eager = res[(batch, variant, "eager")]
                last = res[(batch, variant, "channels_last")] / eager
                comp = f"{res[(batch, variant, 'compiled')] / eager:.2f}×" if "compiled" in modes else "—"
                lines.append(f"| {n} | {batch} | {variant} | {eager:.1f} | {last:.2f}× | {comp} |")
    lines.append("")
    for mode in modes[1:]:
        ratios = [r[(b, v, mode)] / r[(b, v, "eager")] for r in results.values() for (b, v, m) in r if m == "eager"]
        lines.append(f"{mode} / eager, geometric mean over all rows: {statistics.geometric_mean(ratios):.2f}×")
    return lines


if __name__ == "__main__":
    main()
