"""Where converted models are deployed: ONNX Runtime (fixed and dynamic batch), torch.compile, eager.

Run by hand on a quiet machine (timings never gate tests):

    python benchmarks/deploy.py                 # writes results/deploy.md
    python benchmarks/deploy.py --quick         # mobilenet_v2 only, fewer rounds, prints only

For every model the static and the converted model (CondConv K=4, default selection;
``--kinds`` adds DyConv and DyNet rows) are timed in the same interleaved rounds on
each path, and each ratio compares the converted model with the static one on the same
path. The best static path (eager, channels_last, compiled, ONNX Runtime) is listed
too, and the floor: the experts' bytes a batch-1 image reads and the MACs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
import torchvision
from core import time_rounds
from torch import nn

import convert
from convert.verify import signal_preserving_init

SIZE = 224
RESULTS = Path(__file__).parent / "results"
TARGETS = {  # (path, batch) -> {model: target ratio converted / static}
    ("ort fixed", 1): {"mobilenet_v2": 1.5, "efficientnet_b0": 1.5, "resnet18": 1.8},
    ("ort dynamic", 16): {"mobilenet_v2": 2.5, "efficientnet_b0": 2.5, "resnet18": 2.5},
    ("compiled", 1): {"mobilenet_v2": 1.3, "efficientnet_b0": 1.3},
    ("compiled", 16): {"mobilenet_v2": 1.6, "efficientnet_b0": 1.6},
    ("eager", 16): {"resnet18": 1.5},
}


def session(path: Path, profile: str | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with 2 intra-op threads, as the machine has; optionally profiling."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_profile(path: Path, feed: dict, warmup: int = 5, runs: int = 20) -> dict[str, float]:
    """Mean ms per run spent in each ONNX op type (after ORT's graph optimisations), from ORT's profiler."""
    sess = session(path, profile=str(path.with_suffix("")))
    for _ in range(warmup + runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    timed_from = run_starts[warmup]
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= timed_from:
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1000 / runs
    return totals


def static_onnx(model: nn.Module, path: Path, batch: int | None) -> None:
    """The static model exported the same way (torch.onnx dynamo exporter)."""
    example = torch.randn(batch or 2, 3, SIZE, SIZE)
    dynamic = None if batch is not None else ({0: torch.export.Dim("batch")},)
    with contextlib.redirect_stdout(None):
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic, input_names=["input"])
    program.save(path)


def ort_path(
    static: nn.Module, converted: nn.Module, folder: Path, batch: int, dynamic: bool, rounds: int, profile: bool
):
    """``(static ms, converted ms, forms, profiles)`` in ONNX Runtime at ``batch``, exported fixed or dynamic.

    With ``profile``, ``profiles`` is ``(static, converted)`` ms per op type from ORT's profiler; else None.
    """
    exported = None if dynamic else batch
    tag = f"{'dyn' if dynamic else 'fix'}{batch}"
    static_onnx(static, folder / f"static-{tag}.onnx", exported)
    result = convert.export_onnx(
        converted,
        folder / f"conv-{tag}.onnx",
        batch=exported,
        input_shape=(3, SIZE, SIZE),
        fold_bn=True,
        overwrite=True,
    )
    a, b = session(folder / f"static-{tag}.onnx"), session(folder / f"conv-{tag}.onnx")
    feed = {"input": torch.randn(batch, 3, SIZE, SIZE).numpy()}
    ms = time_rounds({"static": lambda: a.run(None, feed), "converted": lambda: b.run(None, feed)}, rounds, 0.4)
    profiles = None
    if profile:
        profiles = (op_profile(folder / f"static-{tag}.onnx", feed), op_profile(folder / f"conv-{tag}.onnx", feed))
    return ms["static"], ms["converted"], result.strategies, profiles


def compiled_path(static: nn.Module, converted: nn.Module, batches: tuple[int, ...], rounds: int):
    """``{batch: (static ms, converted ms)}`` for torch.compile(dynamic=True), inductor."""
    torch._dynamo.reset()
    cs, cc = torch.compile(static, dynamic=True), torch.compile(converted, dynamic=True)
    out = {}
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, 3, SIZE, SIZE)
            ms = time_rounds({"static": lambda: cs(x), "converted": lambda: cc(x)}, rounds, 0.4)  # noqa: B023
            out[batch] = (ms["static"], ms["converted"])
    return out


def eager_path(static: nn.Module, converted: nn.Module, batch: int, rounds: int):
    """``(static ms, static channels_last ms, converted ms)`` in eager PyTorch."""
    x = torch.randn(batch, 3, SIZE, SIZE)
    last = static.to(memory_format=torch.channels_last)
    xl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ms = time_rounds(
            {"static": lambda: static(x), "last": lambda: last(xl), "converted": lambda: converted(x)}, rounds, 0.4
        )
    static.to(memory_format=torch.contiguous_format)
    return ms["static"], ms["last"], ms["converted"]


def mixing_ms(converted: nn.Module, rounds: int) -> float:
    """ms to mix every dynamic layer's kernel for one image (``routing @ experts``): the expert bytes' read cost."""
    import dynconv

    weights = [m.weight.detach().flatten(1) for m in converted.modules() if isinstance(m, dynconv.DynamicConv2d)]
    routing = [torch.full((1, w.shape[0]), 1.0 / w.shape[0]) for w in weights]

    def mix() -> None:
        for r, w in zip(routing, weights, strict=True):
            torch.mm(r, w)

    with torch.inference_mode():
        return time_rounds({"mix": mix}, rounds, 0.4)["mix"]


def floor(result: convert.ConversionResult) -> tuple[float, float, float]:
    """(MB of weights a batch-1 image reads: static, converted; MACs increase) of the converted layers."""
    static_mb = sum(r.params_before for r in result.layers) * 4 / 2**20
    converted_mb = sum(r.params_after for r in result.layers) * 4 / 2**20
    return static_mb, converted_mb, result.totals["macs_increase"]


def profile_lines(profiles: dict[str, tuple[dict[str, float], dict[str, float]]]) -> list[str]:
    """Markdown: per model, ms per op type at batch 1 (ORT fixed batch), static beside CondConv."""
    if not profiles:
        return []
    lines = ["", "## Where the time goes: ONNX Runtime, fixed batch 1, CondConv", ""]
    lines += ["ORT's profiler, ms per image per op type after ORT's own fusions (static: Conv+BN+ReLU fused,"]
    lines += ["weights pre-packed; converted: BatchNorm folded into the experts before export).", ""]
    for name, (static, converted) in profiles.items():
        lines += [f"**{name}**", "", "| op | static ms | converted ms | extra |", "|---|---|---|---|"]
        ops = sorted(set(static) | set(converted), key=lambda op: -(converted.get(op, 0.0) - static.get(op, 0.0)))
        for op in ops:
            a, b = static.get(op, 0.0), converted.get(op, 0.0)
            if max(a, b) >= 0.05:
                lines.append(f"| {op} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
        lines.append(f"| total | {sum(static.values()):.2f} | {sum(converted.values()):.2f} | |")
        lines.append("")
    return lines


def floor_report(kinds: list[str], rounds: int) -> None:
    """Batch 1 in ONNX Runtime: static time + the time to read every expert once = the best a mixing kind can do."""
    lines = ["# Batch-1 floor of kernel mixing", "", f"torch {torch.__version__}, onnxruntime {ort.__version__}, "]
    lines[-1] += f"2 threads, {SIZE}x{SIZE}, K=4, median of {rounds} rounds. Regenerate: `python benchmarks/deploy.py "
    lines[-1] += "--floor --kinds condconv,dyconv,dynet`."
    lines += ["", "A kind that mixes K kernels per image must read every expert once per image; `mix ms` times"]
    lines += ["exactly that (one `routing @ experts` GEMV per converted layer, in PyTorch). `floor` is"]
    lines += ["(static ORT + mix) / static ORT: the converted/static ratio if everything else cost what the"]
    lines += ["static model's convs cost.", ""]
    lines += ["| model | kind | expert MB | static ORT b1 ms | mix ms | floor |", "|---|---|---|---|---|---|"]
    for name in ("resnet18", "mobilenet_v2", "efficientnet_b0"):
        torch.manual_seed(0)
        static = signal_preserving_init(getattr(torchvision.models, name)()).eval()
        with tempfile.TemporaryDirectory() as tmp:
            static_onnx(static, Path(tmp) / "static.onnx", 1)
            sess = session(Path(tmp) / "static.onnx")
            feed = {"input": torch.randn(1, 3, SIZE, SIZE).numpy()}
            base = time_rounds({"static": lambda: sess.run(None, feed)}, rounds, 0.4)["static"]  # noqa: B023
        for kind in kinds:
            result = convert.convert_model(static, kind=kind, experts=4)
            mix = mixing_ms(result.model.eval(), rounds)
            mb = floor(result)[1]
            lines.append(f"| {name} | {kind} | {mb:.1f} | {base:.2f} | {mix:.2f} | {(base + mix) / base:.2f}× |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "floor.md").write_text(text)
    print(f"wrote {RESULTS / 'floor.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="mobilenet_v2 only, fewer rounds, print only")
    parser.add_argument("--kinds", default="condconv", help="comma-separated kinds (default condconv)")
    parser.add_argument("--compile-kinds", default="condconv", help="kinds also timed under torch.compile")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument(
        "--paths", default="ort,eager,compiled", help="paths to time; a subset writes results/deploy-<paths>.md"
    )
    parser.add_argument("--floor", action="store_true", help="only the batch-1 floor: writes results/floor.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.floor:
        floor_report(args.kinds.split(","), args.rounds)
        return
    models = ("mobilenet_v2",) if args.quick else ("resnet18", "mobilenet_v2", "efficientnet_b0")
    rounds = 3 if args.quick else args.rounds
    started = time.perf_counter()
    rows, ratios, floors, profiles = [], {}, [], {}
    paths = args.paths.split(",")
    every_path = set(paths) == {"ort", "eager", "compiled"}
    for name in models:
        torch.manual_seed(0)
        static = signal_preserving_init(getattr(torchvision.models, name)()).eval()
        for kind in args.kinds.split(","):
            result = convert.convert_model(static, kind=kind, experts=4)
            converted = result.model.eval()
            floors.append((name, kind, *floor(result)))
            with tempfile.TemporaryDirectory() as tmp:
                for batch, dynamic in ((1, False), (16, False), (16, True)) if "ort" in paths else ():
                    profile = batch == 1 and kind == "condconv"
                    s, c, forms, prof = ort_path(static, converted, Path(tmp), batch, dynamic, rounds, profile)
                    if prof is not None:
                        profiles[name] = prof
                    path = "ort dynamic" if dynamic else "ort fixed"
                    rows.append(
                        (name, kind, path, batch, s, c, ", ".join(f"{k} {v}" for k, v in sorted(forms.items())))
                    )
                    ratios[(path, batch, name, kind)] = c / s
                    print(rows[-1], flush=True)
            if "eager" in paths:
                s, last, c = eager_path(static, converted, 16, rounds)
                rows.append((name, kind, "eager", 16, s, c, f"static channels_last {last:.1f} ms"))
                ratios[("eager", 16, name, kind)] = c / s
                print(rows[-1], flush=True)
            compile_this = "compiled" in paths and kind in args.compile_kinds.split(",")
            if not args.no_compile and name != "resnet18" and compile_this:
                for batch, (s, c) in compiled_path(static, converted, (1, 16), rounds).items():
                    rows.append((name, kind, "compiled", batch, s, c, "dynamic=True, inductor"))
                    ratios[("compiled", batch, name, kind)] = c / s
                    print(rows[-1], flush=True)
    minutes = (time.perf_counter() - started) / 60
    env = (
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.machine()}, 2 threads, {SIZE}x{SIZE}, "
        f"K=4, static and converted timed in the same interleaved rounds (median of {rounds}); "
        f"run took {minutes:.1f} min"
    )
    lines = ["# Deployment paths: converted / static on the same path", "", env, "", "## Targets", ""]
    lines += ["| path | batch | model | kind | converted / static | target | met |", "|---|---|---|---|---|---|---|"]
    for (path, batch), targets in TARGETS.items():
        for model, target in targets.items():
            for (p, b, m, k), ratio in ratios.items():
                if (p, b, m) == (path, batch, model):
                    met = "yes" if ratio <= target else "NO"
                    lines.append(f"| {path} | {batch} | {m} | {k} | {ratio:.2f}× | ≤ {target}× | {met} |")
    lines += ["", "## All paths", "", "| model | kind | path | batch | static ms | converted ms | ratio | note |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for name, kind, path, batch, s, c, note in rows:
        lines.append(f"| {name} | {kind} | {path} | {batch} | {s:.1f} | {c:.1f} | {c / s:.2f}× | {note} |")
    lines += ["", "## Floor", "", "Weights of the converted layers a batch-1 image reads, and the MACs added:", ""]
    lines += ["| model | kind | static MB | converted MB (all experts) | MACs |", "|---|---|---|---|---|"]
    for name, kind, smb, cmb, macs in floors:
        lines.append(f"| {name} | {kind} | {smb:.1f} | {cmb:.1f} | {100 * macs:+.1f}% |")
    lines += profile_lines(profiles)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        out = RESULTS / ("deploy.md" if every_path else f"deploy-{'-'.join(paths)}.md")
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
