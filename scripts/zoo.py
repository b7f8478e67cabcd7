"""Zoo sweep: convert every torchvision classifier and one model per timm family, each kind.

Each model runs in its own subprocess with a time limit (one crash or hang cannot
stop the sweep). Per kind it records: convs converted, max relative difference to
the original (eval), whether two training steps train and separate the experts,
whether the checkpoint round trip reproduces the outputs, and seconds. Results go
to ``benchmarks/results/zoo.md``.

    python scripts/zoo.py                       # the full sweep (about an hour on 2 cores)
    python scripts/zoo.py --models torchvision:resnet18 timm:mixnet_s --out /tmp/zoo.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "zoo.md"
KINDS = ("condconv", "dyconv", "dynet", "dcd", "odconv")
NOT_APPLICABLE = "n/a: the model has no nn.Conv2d, nothing to convert"
#: A recipe whose one rule keeps every conv: forces the default skips (a model with only a stem conv).
KEEP_ALL = {"rules": [{"skip": False}]}
#: Regularisers that drop whole branches or activations at random (torchvision, timm): off in the training check.
DROP_MODULES = ("StochasticDepth", "DropPath", "DropBlock2d")
CONV_PARAM_BUDGET = 50_000_000  # ResNet-101's convs (43M) fit 300 s per model; ResNet-152's (58M) do not
SMALL_HINTS = ("atto", "femto", "pico", "nano", "tiny", "small", "_s", "18", "b0", "mobile", "lite", "xxs", "t0")


def smallest_per_timm_family() -> list[str]:
    """One timm model per module (family): the one with the fewest parameters, built on 'meta'."""
    import timm
    import torch

    chosen = []
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if not names:
            continue
        hinted = sorted(names, key=lambda n: (not any(h in n for h in SMALL_HINTS), len(n), n))[:12]
        best, best_params = None, None
        for name in hinted:
            try:
                with torch.device("meta"):
                    model = timm.create_model(name)
                params = sum(p.numel() for p in model.parameters())
            except Exception:  # some architectures cannot build on meta; skip them as candidates
                continue
            if best_params is None or params < best_params:
                best, best_params = name, params
        chosen.append(best or hinted[0])
    return chosen


def meta_params(source: str, name: str) -> int:
    """Parameter count without allocating weights (built on the 'meta' device)."""
    import timm
    import torch
    import torchvision

    try:
        with torch.device("meta"):
            model = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # cannot build on meta: treat as large, run last
        return 10**12


def all_models() -> list[tuple[str, str]]:
    """Every torchvision classifier and one model per timm family, smallest first (so the
    sweep's early minutes cover most models and the giants, which may time out, come last)."""
    import torchvision

    models = [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    models += [("timm", n) for n in smallest_per_timm_family()]
    return sorted(models, key=lambda m: meta_params(*m))


# ---------------------------------------------------------------- one model, in a subprocess


def run_one(source: str, name: str, kinds: list[str], size: int, conv_budget: int = CONV_PARAM_BUDGET) -> list[dict]:
    """Convert ``name`` with each kind and check it; returns one row per kind."""
    import gc
    import tempfile

    import torch

    import convert
    import dynconv
    from convert.verify import compare, depends_on_input, output, signal_preserving_init

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = convert.build_model(name, source).eval()
    conv_params = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Conv2d))
    if conv_params == 0:
        return [{"kind": kind, "error": NOT_APPLICABLE, "seconds": 0.0} for kind in kinds]
    if conv_params > conv_budget:
        reason = (
            f"over the sweep budget: {conv_params / 1e6:.0f}M conv parameters (x4 experts, checkpoint round "
            "trip) do not fit 300 s on 2 cores; convert it with `dynconv convert` on its own"
        )
        return [{"kind": kind, "error": reason, "seconds": 0.0} for kind in kinds]
    shape = _workable_size(base, size)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    if not depends_on_input(output(base, x)):  # e.g. GoogLeNet's std-0.01 init
        signal_preserving_init(base)
    rows = []
    for kind in kinds:
        result = model = loaded = None  # one converted model alive at a time: the largest fit only so
        gc.collect()
        start = time.perf_counter()
        row = {"kind": kind, "size": shape[1]}
        try:
            try:
                result = convert.convert_model(base, kind=kind, experts=4, input_size=shape)
            except convert.SelectionError:  # only a stem conv (ViTs): show it converts when asked
                result = convert.convert_model(base, kind=kind, experts=4, input_size=shape, recipe=KEEP_ALL)
                row["note"] = "only stem convs; converted with a rule skip: false"
            row["converted"] = len(result.layers)
            row["skipped"] = len(result.skipped)
            model = result.model.eval()
            check = compare(base, model, x)
            row["rel_diff"] = check.max_rel
            row["equal"] = check.ok
            if not check.input_sensitive:
                row["note"] = "output does not depend on the input: comparison would be vacuous"
            expected = output(model, x)
            with tempfile.TemporaryDirectory() as tmp:
                path = convert.save_checkpoint(result, Path(tmp) / "m.safetensors")
                del result  # its model is ``model``; free what is not needed before reloading
                loaded = convert.load_checkpoint(path)
                row["checkpoint"] = bool(torch.equal(output(loaded, x), expected))
                del loaded
            row["train"] = _train_ok(model, x, dynconv)
        except Exception as exc:  # record, do not stop: the table lists every failure's reason
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
    return rows


def _workable_size(model, size: int) -> tuple[int, int, int]:
    """64x64 when the model accepts it in eval and train mode (fast), else its own default size."""
    import copy

    import torch

    from convert.probe import default_input_size

    channels, height, width = default_input_size(model)
    if size < min(height, width):
        try:
            with torch.no_grad():
                model(torch.zeros(2, channels, size, size))
                copy.deepcopy(model).train()(torch.randn(2, channels, size, size))  # aux heads run in train
            return (channels, size, size)
        except Exception:  # fixed-size models (ViT, Swin...) or deep stride stacks: use their own size
            pass
    return (channels, height, width)


def _train_ok(model, x, dynconv, max_steps: int = 4) -> bool:
    """Adam steps until every expert has received gradient and, in some
    layer, the experts' gradients differ (they are being trained apart).

    Gradients, not weight changes, are checked: with ConvNeXt's 1e-6 layer scale a
    small SGD step rounds away in float32 (and Adam is used for the same reason).
    Step 1 moves the zeroed routers, step 2 lets routing tell the experts apart; a
    zero-initialised head (torchvision ViT) needs one more step before gradients reach
    the convs. The loss is a regression to random targets, which never saturates.
    Kinds with one kernel per layer (DCD, ODConv with n = 1) have no experts to tell
    apart: for them every parameter of every dynamic layer must receive gradient at
    some step (DCD's P and Q only once Phi has moved). Dropout and stochastic depth stay
    off (eval): a block whose residual branch is dropped for the whole small batch gets
    no gradient that step, which says nothing about the conversion.
    """
    import torch
    import torch.nn.functional as F

    layers = dynconv.dynamic_layers(model)
    single = all(layer.weight.shape[0] == 1 for layer in layers.values())
    dynconv.set_temperature(model, 1.0)
    # Adam: scale-free steps, so routers move even where layer scale (1e-6) shrinks gradients.
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)  # no model-sized temporaries
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) or type(module).__name__ in DROP_MODULES:
            module.eval()
    reached: set[str] = set()
    got_grad: set[tuple[str, str]] = set()
    separated = False
    for _ in range(max_steps):
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        loss = F.mse_loss(out.float(), target)
        if not torch.isfinite(loss):
            return False
        opt.zero_grad()
        loss.backward()
        for name, layer in layers.items():
            grad = layer.weight.grad
            if grad is None:
                continue
            per_expert = grad.flatten(1)
            if single:
                params = dict(layer.named_parameters())
                got_grad.update((name, p) for p, t in params.items() if t.grad is not None and t.grad.abs().sum() > 0)
                if all((name, p) in got_grad for p in params):
                    reached.add(name)
                separated = True
                continue
            if (per_expert.abs().sum(1) > 0).all():
                reached.add(name)
            separated = separated or bool(((per_expert - per_expert.mean(0)).abs().max() > 0).item())
        opt.step()
        if len(reached) == len(layers) and separated:
            return True
    return False


# ---------------------------------------------------------------- the sweep


def _limit_memory(gib: float) -> None:
    """Cap a worker's address space so one giant model fails alone instead of the OOM killer."""
    import resource

    limit = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def sweep_one(
    source: str, name: str, kinds: list[str], size: int, timeout: int, memory_gib: float, conv_budget: int
) -> list[dict]:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        f"{source}:{name}",
        "--kinds",
        ",".join(kinds),
        "--size",
        str(size),
        "--max-conv-params",
        str(conv_budget),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
            preexec_fn=lambda: _limit_memory(memory_gib),
        )
    except subprocess.TimeoutExpired:
        return [{"kind": k, "error": f"timeout after {timeout} s", "seconds": timeout} for k in kinds]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ZOO ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        if proc.returncode < 0:
            tail = f"killed by signal {-proc.returncode} (likely out of memory)"
        secs = round(time.perf_counter() - start, 1)
        return [{"kind": k, "error": tail, "seconds": secs} for k in kinds]
    return json.loads(lines[-1][4:])


def passed(row: dict) -> bool:
    return "error" not in row and row.get("converted", 0) > 0 and row["equal"] and row["train"] and row["checkpoint"]


def write_table(
    results: dict[tuple[str, str], list[dict]],
    kinds: list[str],
    out: Path,
    elapsed: float,
    args_memory: float,
    args_timeout: int,
) -> str:
    lines = ["# Zoo sweep", ""]
    total = len(results)
    summary = []
    applicable = [rows for rows in results.values() if not any(r.get("error") == NOT_APPLICABLE for r in rows)]
    for kind in kinds:
        ok = sum(passed(r) for rows in applicable for r in rows if r["kind"] == kind)
        summary.append(f"| {kind} | {ok} / {len(applicable)} | {100 * ok / max(len(applicable), 1):.1f}% |")
    lines += [
        f"{total} models (every torchvision classifier, the smallest model of every timm family), "
        f"K=4 experts, seeded random weights (re-initialised variance-preserving where the zoo's default init "
        f"makes the output ignore the input), 64x64 input where the model accepts it "
        f"in eval and train mode, else its own size; at most {args_memory} GiB and {args_timeout} s per model. "
        f"Sweep time {elapsed / 60:.1f} min on 2 cores. Regenerate with `python scripts/zoo.py`.",
        "",
        "A model passes a kind when it converts at least one conv, the converted model equals the original "
        "(max |diff| <= 1e-4 max |orig| + 1e-5, eval, on an output that depends on the input), up to four "
        "optimiser steps give every expert gradient and the experts different gradients (with one kernel "
        "per layer, DCD or ODConv 1x: every parameter of every dynamic layer gets gradient at some step; "
        "dropout and stochastic depth off), "
        "and the checkpoint reloads (rebuilt by name) to bit-identical outputs.",
        "",
        f"{total - len(applicable)} models have no nn.Conv2d at all and are left out of the shares.",
        "",
        "| kind | models passing | share |",
        "|---|---|---|",
        *summary,
        "",
        "| model | kind | size | converted | skipped | max rel diff | train ok | checkpoint ok | s | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (source, name), rows in sorted(results.items()):
        for r in rows:
            if "error" in r:
                mark = "" if r["error"] == NOT_APPLICABLE else "FAIL: "
                lines.append(f"| {source}:{name} | {r['kind']} | | | | | | | {r['seconds']} | {mark}{r['error']} |")
                continue
            mark = "" if passed(r) else "FAIL "
            lines.append(
                f"| {source}:{name} | {r['kind']} | {r['size']} | {r['converted']} | {r['skipped']} "
                f"| {r['rel_diff']:.1e} | {'yes' if r['train'] else 'no'} | {'yes' if r['checkpoint'] else 'no'} "
                f"| {r['seconds']} | {mark}{r.get('note', '')} |"
            )
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return "\n".join(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="source:name entries (default: the whole zoo)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model, all kinds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--max-conv-params",
        type=int,
        default=CONV_PARAM_BUDGET,
        help="models with more conv parameters are recorded as over budget, not run",
    )
    parser.add_argument("--memory-gib", type=float, default=11.0, help="address-space cap per model subprocess")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="update the rows of --models in the existing results (the .json beside --out)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    sys.path.insert(0, str(ROOT))
    if args.one:
        source, name = args.one.split(":", 1)
        print("ZOO " + json.dumps(run_one(source, name, kinds, args.size, args.max_conv_params)), flush=True)
        return
    models = [tuple(m.split(":", 1)) for m in args.models] if args.models else all_models()
    start = time.perf_counter()
    results: dict[tuple[str, str], list[dict]] = {}

    def job(model: tuple[str, str]) -> None:
        results[model] = sweep_one(
            model[0], model[1], kinds, args.size, args.timeout, args.memory_gib, args.max_conv_params
        )
        if args.merge and args.models:  # say which rows ran with other limits than the sweep's header states
            alone = f"re-run alone with {args.memory_gib:g} GiB and {args.timeout} s"
            for r in results[model]:
                key = "error" if "error" in r else "note"
                r[key] = "; ".join(filter(None, [r.get(key, ""), alone]))
        fails = [r["kind"] for r in results[model] if not passed(r)]
        status = "ok" if not fails else f"FAIL {fails}"
        print(f"[{len(results)}/{len(models)}] {model[0]}:{model[1]} {status}", flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(job, models))
    elapsed = time.perf_counter() - start
    memory, timeout = args.memory_gib, args.timeout
    if args.merge and args.out.exists():
        text = args.out.read_text()
        previous, previous_elapsed = parse_table(text)
        limits = re.search(r"at most ([\d.]+) GiB and (\d+) s per model", text)
        if limits:  # the header keeps the sweep's own limits; re-run rows say theirs
            memory, timeout = float(limits[1]), int(limits[2])
        for model, rows in results.items():  # overlay the re-run kinds, keep the others
            kept = [r for r in previous.get(model, []) if r["kind"] not in {row["kind"] for row in rows}]
            previous[model] = sorted(kept + rows, key=lambda r: KINDS.index(r["kind"]))
        results, elapsed = previous, previous_elapsed + elapsed
        kinds = [k for k in KINDS if any(r["kind"] == k for rows in results.values() for r in rows)]
    print(write_table(results, kinds, args.out, elapsed, memory, timeout))
    print(f"wrote {args.out}")


def parse_table(text: str) -> tuple[dict[tuple[str, str], list[dict]], float]:
    """Read back a table this script wrote: rows per model, and the sweep minutes as seconds."""
    results: dict[tuple[str, str], list[dict]] = {}
    elapsed = 0.0
    for line in text.splitlines():
        if "Sweep time " in line:
            elapsed = float(line.split("Sweep time ")[1].split(" min")[0]) * 60
        if not line.startswith("| ") or ":" not in line.split("|")[1]:
            continue
        cells = [c.strip() for c in line.split("|")[1:-1]]
        source, name = cells[0].split(":", 1)
        row: dict = {"kind": cells[1], "seconds": float(cells[8] or 0)}
        if not cells[2]:  # no size: the row records an error (or n/a), not a run
            row["error"] = cells[9].removeprefix("FAIL: ")
        else:
            note = cells[9].removeprefix("FAIL").strip()
            row.update(
                size=int(cells[2]),
                converted=int(cells[3]),
                skipped=int(cells[4]),
                rel_diff=float(cells[5]),
                train=cells[6] == "yes",
                checkpoint=cells[7] == "yes",
                equal=float(cells[5]) <= 1e-4 and "vacuous" not in note,
            )
            if note:
                row["note"] = note
        results.setdefault((source, name), []).append(row)
    return results, elapsed


if __name__ == "__main__":
    main()
