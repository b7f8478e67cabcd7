"""Where converted models are deployed: ONNX Runtime (fixed and dynamic batch), torch.compile, eager.

Run by hand on a quiet machine (timings never gate tests):

    python benchmarks/deploy.py                 # every kind, every path: writes results/deploy.md
    python benchmarks/deploy.py --quick         # mobilenet_v2 only, fewer rounds, prints only

For every model the static and the converted model (each kind of ``--kinds``: CondConv,
DyConv, DyNet and ODConv with K=4, DCD, ODConv 1x; default selection) are timed in the
same interleaved rounds on each path, and each ratio compares the converted model with
the static one on the same path. DCD and ODConv 1x are also timed, at ORT fixed batch,
as they exported before their deployment forms (every layer pinned to a per-sample
kernel), and profiled per op type both ways. For every model and kind the floor at batch 1
is the static model plus the kind's unavoidable extra work timed alone (``deploy_floor.py``),
on the same path: in ONNX Runtime (the extra work exported as a graph of its own) and in
eager PyTorch. Every batch-1 ratio is read against the floor of its path.
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
from deploy_floor import eager_floor, extra_work, ort_floor
from torch import nn

import convert
import dynconv
from convert.verify import signal_preserving_init
from dynconv.core.rules import runs_as_matmul

SIZE = 224
RESULTS = Path(__file__).parent / "results"
MIXING = ("condconv", "dyconv", "dynet", "odconv4")
#: label -> convert_model options; ODConv with one expert ("ODConv 1x") and with four.
KINDS = {
    "condconv": {"kind": "condconv", "experts": 4},
    "dyconv": {"kind": "dyconv", "experts": 4},
    "dynet": {"kind": "dynet", "experts": 4},
    "odconv4": {"kind": "odconv", "experts": 4},
    "dcd": {"kind": "dcd"},
    "odconv1": {"kind": "odconv", "experts": 1},
}
MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0")
TARGETS = {  # (path, batch) -> {(model, kind): target ratio converted / static}
    ("ort fixed", 1): {
        **{(m, k): t for m, t in (("mobilenet_v2", 1.5), ("efficientnet_b0", 1.5), ("resnet18", 1.8)) for k in MIXING},
        **{(m, "dcd"): 1.25 for m in MODELS},
        **{(m, "odconv1"): 1.4 for m in MODELS},
    },
    ("ort dynamic", 16): {(m, k): 2.5 for m in MODELS for k in MIXING},
    ("compiled", 1): {(m, k): 1.3 for m in ("mobilenet_v2", "efficientnet_b0") for k in MIXING}
    | {(m, "dcd"): 1.2 for m in ("mobilenet_v2", "efficientnet_b0")},
    ("compiled", 16): {(m, k): 1.6 for m in ("mobilenet_v2", "efficientnet_b0") for k in MIXING}
    | {(m, "dcd"): 1.2 for m in ("mobilenet_v2", "efficientnet_b0")},
    ("eager", 1): {(m, "dcd"): 1.2 for m in MODELS},
    ("eager", 16): {("resnet18", k): 1.5 for k in MIXING} | {(m, "dcd"): 1.2 for m in MODELS},
}
#: Kinds with a deployment form that keeps the static kernel static: also timed as exported before it.
DEPLOY_FORMS = ("dcd", "odconv1")


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


@contextlib.contextmanager
def per_sample_kernels(model: nn.Module, batch: int):
    """Pin every dynamic layer to the per-sample-kernel form exports used before the deployment forms."""
    layers = [m for m in model.modules() if isinstance(m, dynconv.DynamicConv2d)]
    for layer in layers:
        pointwise = runs_as_matmul(layer._geometry, layer.in_channels) and layer.padding_mode == "zeros"
        layer.strategy = ("matmul" if pointwise else "single") if batch == 1 else "grouped"
    try:
        yield
    finally:
        for layer in layers:
            layer.strategy = None


def onnx_file(folder: Path, role: str, batch: int, dynamic: bool) -> Path:
    """Where :func:`ort_path` writes the ``role`` graph (static, converted, before) of one batch setting."""
    return folder / f"{role}-{'dyn' if dynamic else 'fix'}{batch}.onnx"


def ort_path(
    static: nn.Module,
    converted: nn.Module,
    folder: Path,
    batch: int,
    dynamic: bool,
    rounds: int,
    before: bool,
    profile: bool,
):
    """``(ms, forms, profiles)`` in ONNX Runtime at ``batch``, exported fixed or dynamic.

    ``ms`` has ``static`` and ``converted`` and, with ``before`` (a fixed batch), ``before``: the
    converted model pinned to per-sample kernels. With ``profile``, ``profiles`` maps the same
    names to ms per op type from ORT's profiler; else None.
    """
    exported = None if dynamic else batch
    files = {role: onnx_file(folder, role, batch, dynamic) for role in ("static", "converted")}
    static_onnx(static, files["static"], exported)
    options = {"batch": exported, "input_shape": (3, SIZE, SIZE), "fold_bn": True, "overwrite": True}
    result = convert.export_onnx(converted, files["converted"], **options)
    if before and not dynamic:
        files["before"] = onnx_file(folder, "before", batch, dynamic)
        with per_sample_kernels(converted, batch):
            convert.export_onnx(converted, files["before"], **options)
    sessions = {name: session(path) for name, path in files.items()}
    feed = {"input": torch.randn(batch, 3, SIZE, SIZE).numpy()}
    ms = time_rounds({name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}, rounds, 0.4)
    profiles = {name: op_profile(path, feed) for name, path in files.items()} if profile else None
    return ms, result.strategies, profiles


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


def profile_lines(profiles: dict[tuple[str, str], dict[str, dict[str, float]]]) -> list[str]:
    """Markdown: per model and kind, ms per op type at batch 1 (ORT fixed batch), static beside the converted
    model (and, for the kinds with a deployment form, beside it as exported before)."""
    lines = ["", "## Where the time goes: ONNX Runtime, fixed batch 1, per op type", ""]
    lines += ["ORT's profiler, ms per image per op type after ORT's own fusions (static: Conv+BN+ReLU fused,"]
    lines += ["weights pre-packed; converted: BatchNorm folded before export; `before`: every dynamic layer"]
    lines += ["pinned to a per-sample kernel, as exports were before the deployment forms).", ""]
    for (name, kind), runs in profiles.items():
        names = list(runs)
        lines += [f"**{name}, {kind}**", "", f"| op | {' ms | '.join(names)} ms |", "|---" * (len(names) + 1) + "|"]
        ops = sorted(set().union(*runs.values()), key=lambda op: -runs["converted"].get(op, 0.0))
        for op in ops:
            values = [runs[n].get(op, 0.0) for n in names]
            if max(values) >= 0.05:
                lines.append(f"| {op} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
        lines.append("| total | " + " | ".join(f"{sum(runs[n].values()):.2f}" for n in names) + " |")
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
            result = convert.convert_model(static, **KINDS[kind])
            mix = mixing_ms(result.model.eval(), rounds)
            mb = floor(result)[1]
            lines.append(f"| {name} | {kind} | {mb:.1f} | {base:.2f} | {mix:.2f} | {(base + mix) / base:.2f}× |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "floor.md").write_text(text)
    print(f"wrote {RESULTS / 'floor.md'}")


def time_model(name: str, kind: str, paths: list[str], rounds: int, compile_kinds: list[str]):
    """``(rows, ratios, floor row, profiles)`` of ``name`` converted to ``kind`` on every path of ``paths``."""
    torch.manual_seed(0)
    static = signal_preserving_init(getattr(torchvision.models, name)()).eval()
    result = convert.convert_model(static, **KINDS[kind])
    converted = result.model.eval()
    rows, ratios, profiles = [], {}, {}

    def add(path: str, batch: int, s: float, c: float, note: str) -> None:
        rows.append((name, kind, path, batch, s, c, note))
        ratios[(path, batch, name, kind)] = c / s
        print(rows[-1], flush=True)

    ort_runs = [(1, False)] if "ort" in paths or "ort1" in paths else []
    ort_runs += [(16, False), (16, True)] if "ort" in paths or "ort16" in paths else []
    floor_row = None
    with tempfile.TemporaryDirectory() as tmp:
        for batch, dynamic in ort_runs:
            before = kind in DEPLOY_FORMS and not dynamic
            profile = batch == 1 and not dynamic and kind in (*DEPLOY_FORMS, "condconv")
            ms, forms, prof = ort_path(static, converted, Path(tmp), batch, dynamic, rounds, before, profile)
            note = ", ".join(f"{k} {v}" for k, v in sorted(forms.items()))
            if "before" in ms:
                note += f"; before: {ms['before']:.1f} ms, {ms['before'] / ms['static']:.2f}×"
            add("ort dynamic" if dynamic else "ort fixed", batch, ms["static"], ms["converted"], note)
            if prof is not None:
                profiles[(name, kind)] = prof
        for batch in (1, 16) if "eager" in paths else ():
            s, last, c = eager_path(static, converted, batch, rounds)
            add("eager", batch, s, c, f"static channels_last {last:.1f} ms")
        if "compiled" in paths and kind in compile_kinds:
            for batch, (s, c) in compiled_path(static, converted, (1, 16), rounds).items():
                add("compiled", batch, s, c, "dynamic=True, inductor")
        if (1, False) in ort_runs:  # the batch-1 floor on the ORT path (its static graph), and on eager if timed
            works, maps = extra_work(converted, SIZE)
            ort_ms = ort_floor(onnx_file(Path(tmp), "static", 1, False), works, maps, SIZE, rounds, session)
            eager_ms = eager_floor(static, works, maps, SIZE, rounds) if "eager" in paths else (None, None, None)
            floor_row = (name, kind, *floor(result), *ort_ms, *eager_ms)
    return rows, ratios, floor_row, profiles


def report(rows: list, ratios: dict, floors: list, profiles: dict, env: str) -> str:
    """The markdown of results/deploy.md."""
    lines = ["# Deployment paths: converted / static on the same path", "", env, "", "## Targets", ""]
    lines += ["| path | batch | model | kind | converted / static | target | met |", "|---|---|---|---|---|---|---|"]
    for (path, batch), targets in TARGETS.items():
        for (model, kind), target in targets.items():
            ratio = ratios.get((path, batch, model, kind))
            if ratio is not None:
                met = "yes" if ratio <= target else "NO"
                lines.append(f"| {path} | {batch} | {model} | {kind} | {ratio:.2f}× | ≤ {target}× | {met} |")
    lines += ["", "## All paths", "", "| model | kind | path | batch | static ms | converted ms | ratio | note |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for name, kind, path, batch, s, c, note in rows:
        lines.append(f"| {name} | {kind} | {path} | {batch} | {s:.1f} | {c:.1f} | {c / s:.2f}× | {note} |")
    lines += floor_lines(floors, ratios)
    lines += profile_lines(profiles) if profiles else []
    return "\n".join(lines) + "\n"


def floor_lines(floors: list, ratios: dict) -> list[str]:
    """Markdown: per model and kind, the weights and MACs of the converted layers and the batch-1 floor
    on each path beside the ratio measured there."""
    lines = ["", "## Floor", "", "Weights of the converted layers a batch-1 image reads, the MACs added, and the"]
    lines += ["floor on each path: (static + the kind's unavoidable extra work timed alone, `deploy_floor.py`)"]
    lines += ["/ static, both timed on that path in the same interleaved rounds (ORT: the extra work exported as"]
    lines += ["a graph of its own), beside the ratio measured there at batch 1. `routing`: the routers alone (pooling"]
    lines += ["and their layers) as a share of the static time, the part every dynamic kind pays.", ""]
    lines += ["| model | kind | static MB | converted MB | MACs | ORT extra ms | ORT routing | ORT floor "]
    lines[-1] += "| ORT fixed 1 | eager extra ms | eager routing | eager floor | eager 1 |"
    lines += ["|---" * 13 + "|"]

    def ratio_text(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}×"

    for name, kind, smb, cmb, macs, *measured in floors:
        cells = [name, kind, f"{smb:.1f}", f"{cmb:.1f}", f"{100 * macs:+.1f}%"]
        for path, (static, extra, routing) in (("ort fixed", measured[:3]), ("eager", measured[3:])):
            if static is None:
                cells += ["", "", "", ""]
                continue
            cells += [f"{extra:.2f}", f"+{routing / static:.0%}", ratio_text((static + extra) / static)]
            cells += [ratio_text(ratios.get((path, 1, name, kind)))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def combine(files: list[Path]) -> None:
    """results/deploy.md from the JSON of several runs (``--output``), in the order given."""
    rows, ratios, floors, profiles, envs = [], {}, [], {}, []
    for file in files:
        runs = json.loads(file.read_text())
        rows += [tuple(r) for r in runs["rows"]]
        floors += [tuple(f) for f in runs["floors"]]
        for key, value in runs["ratios"].items():
            path, batch, model, kind = key.split("|")
            ratios[(path, int(batch), model, kind)] = value
        profiles |= {tuple(k.split("|")): v for k, v in runs["profiles"].items()}
        envs.append(runs["env"])
    settings = list(dict.fromkeys(env.rsplit("; run took ", 1)[0] for env in envs))
    took = ", ".join(f"{file.stem} {env.rsplit('run took ', 1)[-1]}" for file, env in zip(files, envs, strict=True))
    env = "; ".join(settings) + f"; {len(files)} runs, one after another: {took}"
    text = report(rows, ratios, floors, profiles, env)
    (RESULTS / "deploy.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="mobilenet_v2 only, fewer rounds, print only")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision models")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--compile-kinds", default=",".join(KINDS), help="kinds also timed under torch.compile")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument(
        "--paths",
        default="ort,eager,compiled",
        help="paths to time (ort1, ort16: ORT at batch 1 or 16 only); a subset writes results/deploy-<paths>.md",
    )
    parser.add_argument("--floor", action="store_true", help="only the batch-1 floor of mixing: writes floor.md")
    parser.add_argument("--output", help="write the measurements here as JSON (for --combine), not the report")
    parser.add_argument("--combine", nargs="+", help="JSON files of runs: write results/deploy.md from them")
    args = parser.parse_args()
    if args.combine:
        combine([Path(f) for f in args.combine])
        return
    torch.set_num_threads(2)
    if args.floor:
        floor_report(args.kinds.split(","), args.rounds)
        return
    models = ("mobilenet_v2",) if args.quick else tuple(args.models.split(","))
    rounds = 3 if args.quick else args.rounds
    paths = [p for p in args.paths.split(",") if not (p == "compiled" and args.no_compile)]
    started = time.perf_counter()
    rows, ratios, floors, profiles = [], {}, [], {}
    for name in models:
        for kind in args.kinds.split(","):
            r, q, f, prof = time_model(name, kind, paths, rounds, args.compile_kinds.split(","))
            rows += r
            ratios |= q
            floors += [f] if f is not None else []
            profiles |= prof
    minutes = (time.perf_counter() - started) / 60
    env = (
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.machine()}, 2 threads, {SIZE}x{SIZE}, "
        f"K=4 (ODConv also 1), static and converted timed in the same interleaved rounds (median of {rounds}); "
        f"run took {minutes:.1f} min"
    )
    if args.output:  # JSON keys are strings: tuples joined by "|"
        runs = {"env": env, "rows": rows, "floors": floors}
        runs["ratios"] = {"|".join(map(str, k)): v for k, v in ratios.items()}
        runs["profiles"] = {"|".join(k): v for k, v in profiles.items()}
        Path(args.output).write_text(json.dumps(runs))
        return
    text = report(rows, ratios, floors, profiles, env)
    print(text)
    if not args.quick:
        every_path = set(paths) == {"ort", "eager", "compiled"}
        out = RESULTS / ("deploy.md" if every_path else f"deploy-{'-'.join(paths)}.md")
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
