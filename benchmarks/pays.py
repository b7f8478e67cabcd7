"""Does it pay? A static ImageNet architecture on Fashion-MNIST against its conversions, same extra epochs.

A static model (torchvision MobileNetV3-Small by default, 64x64, 3 replicated channels) is
trained for ``--base-epochs`` (seed 0; cached on disk), then, from that checkpoint, for
``--epochs`` more with the same data order per seed: (a) static continued, (b) each kind
converted (``convert.convert_model(..., seed=s)``, checked exact) and fine-tuned, (c) static
trained for the wall time the best converted kind took. Every model runs through the same
loop (``pays_loop``). Settings are chosen on a validation split carved from the training set:

    python benchmarks/pays.py sweep --kinds static condconv --grid opt=sgd,adamw lr_mult=0.5,1,2
    python benchmarks/pays.py final            # 3 seeds on the test set, best sweep settings per kind
    python benchmarks/pays.py report           # benchmarks/results/pays.md from the two JSON files

``--data`` is the folder with the idx files (default ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion import SYSTEM_DATA, MissingDataError, as_input, load_splits, write_folder
from pays_loop import Settings, accuracy, max_logit_diff, train
from pays_report import MEASURED, RESULTS_DIR, write_report

import convert
import dynconv
from convert.analyze import analyze

KINDS = ("condconv", "dyconv", "dynet", "dcd", "odconv")
BN_MOMENTUM = 0.1  # every BatchNorm's running-statistics momentum (PyTorch's default)
BASE_SETTINGS = Settings(opt="sgd", lr_mult=5.0, warmup=0.05, batch_size=128)  # from scratch: SGD lr 0.1


def parse_value(text: str) -> Any:
    """``"3"`` → 3, ``"0.1"`` → 0.1, anything else stays text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def grid_settings(grid: list[str], static: bool) -> list[Settings]:
    """Every combination of ``key=v1,v2`` entries; keys that are not loop settings go to ``convert_model``."""
    names = {f.name for f in fields(Settings)}
    axes = [(key, [parse_value(v) for v in values.split(",")]) for key, values in (g.split("=", 1) for g in grid)]
    out: list[Settings] = []
    for combo in itertools.product(*[values for _, values in axes]):
        chosen = dict(zip([k for k, _ in axes], combo, strict=True))
        if static:  # router and conversion knobs mean nothing to a static model
            chosen = {
                k: v for k, v in chosen.items() if k in names and k not in ("router_lr_scale", "temp_frac", "calibrate")
            }
        loop = {k: v for k, v in chosen.items() if k in names}
        extra = tuple(sorted((k, v) for k, v in chosen.items() if k not in names))
        settings = Settings(**loop, convert=extra)
        if settings not in out:
            out.append(settings)
    return out


def settings_from(record: dict) -> Settings:
    data = dict(record["settings"])
    data["convert"] = tuple(tuple(kv) for kv in data.get("convert", ()))
    return Settings(**data)


class Bench:
    """The data, the base checkpoint and the run bookkeeping shared by ``sweep`` and ``final``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache = Path(args.cache)
        self.splits = load_splits(
            Path(args.data), self.cache, args.size, train_size=args.train_size, val_size=args.val_size,
            test_size=args.test_size,
        )  # fmt: skip
        self.setup = {
            "model": args.model,
            "size": args.size,
            "train": len(self.splits["train"]),
            "val": len(self.splits["val"]),
            "test": len(self.splits["test"]),
            "base_epochs": args.base_epochs,
            "epochs": args.epochs,
            "threads": args.threads,
        }
        self.base, self.base_info = self._base()

    def steps(self, settings: Settings, epochs: int | None = None) -> int:
        return (epochs or self.args.epochs) * (len(self.splits["train"]) // settings.batch_size)

    def _base(self) -> tuple[torch.nn.Module, dict]:
        """The static model after ``base_epochs`` (seed 0), trained once and cached."""
        a = self.args
        count = len(self.splits["train"])
        tag = f"base-{a.model}-{a.size}-n{count}-e{a.base_epochs}-bn{BN_MOMENTUM}-{BASE_SETTINGS.label()}"
        path = self.cache / (tag.replace(" ", "_") + ".pt")
        torch.manual_seed(0)
        model = convert.build_model(a.model, num_classes=10)
        for module in model.modules():  # MobileNetV3's 0.01 is for 600 ImageNet epochs: here the stats would lag
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = BN_MOMENTUM
        if path.is_file():
            saved = torch.load(path)
            model.load_state_dict(saved["state"])
            return model.eval(), saved["info"]
        log = train(model, self.splits["train"], BASE_SETTINGS, seed=0, steps=self.steps(BASE_SETTINGS, a.base_epochs))
        info = {
            "settings": BASE_SETTINGS.label(),
            "epoch_seconds": log.epoch_seconds,
            "losses": log.losses,
            "val_acc": accuracy(model, self.splits["val"]),
            "test_acc": accuracy(model, self.splits["test"]),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "info": info}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        print(f"base: {info}", flush=True)
        return model.eval(), info

    def model_for(self, kind: str, settings: Settings, seed: int) -> tuple[torch.nn.Module, float | None]:
        """A fresh copy of the base (static) or its conversion, with the conversion's max logit difference."""
        if kind == "static":
            return copy.deepcopy(self.base), None
        options = dict(settings.convert)
        result = convert.convert_model(self.base, kind=kind, seed=seed, input_size=self.args.size, **options)
        if settings.calibrate:  # on training images in the seed's order, before any step
            train = self.splits["train"]
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
            size = settings.batch_size
            batches = [as_input(train.images[order[i * size : (i + 1) * size]]) for i in range(settings.calibrate)]
            dynconv.calibrate_routing(result.model, batches, seed=seed)
        return result.model, max_logit_diff(self.base, result.model, self.splits["val"])

    def run(self, kind: str, settings: Settings, seed: int, *, steps: int | None = None, test: bool = False) -> dict:
        """Train one arm from the base and return its record (validation, and test when ``test``)."""
        model, diff = self.model_for(kind, settings, seed)
        steps = steps or self.steps(settings)
        log = train(model, self.splits["train"], settings, seed=seed, steps=steps)
        record = {
            "kind": kind,
            "settings": asdict(settings),
            "label": settings.label(),
            "seed": seed,
            "steps": steps,
            "epochs": steps / log.steps_per_epoch,
            "epoch_seconds": log.epoch_seconds,
            "seconds": log.seconds,
            "losses": log.losses,
            "max_diff": diff,
            "setup": self.setup,
        }
        record["test_acc" if test else "val_acc"] = accuracy(model, self.splits["test" if test else "val"])
        record["model"] = model
        return record


def load_json(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def sweep_records(results: Path) -> list[dict]:
    """Every sweep run so far: ``pays-sweep.json`` and the parts written by parallel processes."""
    return [r for path in sorted(results.glob("pays-sweep*.json")) for r in load_json(path)]


def save_json(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{k: v for k, v in r.items() if k != "model"} for r in records], indent=1) + "\n")
    tmp.rename(path)


def sweep(bench: Bench, args: argparse.Namespace) -> None:
    """Seed 0, validation only: every kind × every grid combination not already in the sweep file."""
    path = args.results / (f"pays-sweep-{args.part}.json" if args.part else "pays-sweep.json")
    records = load_json(path)
    done = {(r["kind"], r["label"], json.dumps(r["setup"], sort_keys=True)) for r in sweep_records(args.results)}
    for kind in args.kinds:
        for settings in grid_settings(args.grid, kind == "static"):
            key = (kind, settings.label(), json.dumps(bench.setup, sort_keys=True))
            if key in done:
                continue
            record = bench.run(kind, settings, seed=0)
            records.append(record)
            done.add(key)
            save_json(path, records)
            seconds = record["epoch_seconds"]
            print(f"{kind} [{record['label']}]: val {record['val_acc']:.4f}, {seconds:.1f} s/epoch", flush=True)


def best_settings(records: list[dict], setup: dict) -> dict[str, dict]:
    """Per kind, the sweep record with the highest validation accuracy under ``setup`` (ignoring seeds/threads)."""
    same = {k: v for k, v in setup.items() if k not in ("test", "threads")}
    best: dict[str, dict] = {}
    for r in records:
        if {k: r["setup"].get(k) for k in same} != same:
            continue
        if r["kind"] not in best or r["val_acc"] > best[r["kind"]]["val_acc"]:
            best[r["kind"]] = r
    return best


def routing(checkpoint: Path, folder: Path) -> dict:
    """``convert.analyze``'s per-model summary numbers: mean entropy, class ratio, expert spread growth."""
    try:
        analysis = analyze(checkpoint, folder)
    except (RuntimeError, convert.DynconvError) as exc:  # recorded, not fatal: accuracy matters more
        return {"error": f"{type(exc).__name__}: {exc}"}
    layers = analysis.layers
    ratios = [s.class_ratio for s in layers if s.class_ratio is not None]
    moved = [s.moved for s in layers if s.moved is not None]
    return {
        "layers": len(layers),
        "entropy": statistics.fmean(s.entropy for s in layers),
        "near_uniform": sum(s.entropy > 0.99 for s in layers),
        "class_ratio_mean": statistics.fmean(ratios) if ratios else None,
        "class_ratio_max": max(ratios) if ratios else None,
        "moved_mean": statistics.fmean(moved) if moved else None,
        "images": analysis.images,
    }


def final(bench: Bench, args: argparse.Namespace) -> None:
    """Every seed: static continued, each kind with its best sweep settings, static for a kind's wall time.

    ``--kinds`` without ``static`` runs only conversions (another process runs static on the same
    seeds); static for equal wall time runs when both static and the wall kind are in ``--kinds``.
    """
    chosen = best_settings(sweep_records(args.results), bench.setup)
    for entry in args.use:  # settings given on the command line win over the sweep's
        kind, _, options = entry.partition(":")
        grid = [] if options in ("", "defaults") else options.split(",")
        chosen[kind] = {"settings": asdict(grid_settings(grid, kind == "static")[0]), "val_acc": -1.0}
    missing = [k for k in ("static", *args.kinds) if k not in chosen]
    if missing:
        raise SystemExit(f"no sweep record for {', '.join(missing)} under this setup: run `pays.py sweep` first")
    kinds = [k for k in args.kinds if k != "static"]
    wall_kind = args.wall_kind or max(kinds, key=lambda k: chosen[k]["val_acc"], default=None)
    static = settings_from(chosen["static"])
    path = args.results / f"pays-final-seeds{'-'.join(map(str, args.seeds))}-{'-'.join(args.kinds)}.json"
    records: list[dict] = []

    def keep(record: dict) -> None:
        record.pop("model", None)
        records.append(record)
        save_json(path, [*records, {"kind": "base", "info": bench.base_info, "setup": bench.setup}])
        print(f"seed {record['seed']} {record['kind']}: test {record['test_acc']:.4f}, "
              f"{record['epoch_seconds']:.1f} s/epoch", flush=True)  # fmt: skip

    folder = write_folder(bench.splits["test"], bench.cache / f"test-{args.size}-png", per_class=args.analyze_per_class)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            this = {"static": bench.run("static", static, seed, test=True)} if "static" in args.kinds else {}
            if this:
                keep(dict(this["static"]))
            for kind in kinds:
                settings = settings_from(chosen[kind])
                before = None
                if seed == args.routing_seed:
                    fresh, _ = bench.model_for(kind, settings, seed)
                    before = routing(convert.save_checkpoint(fresh, Path(tmp) / f"{kind}-0.safetensors"), folder)
                this[kind] = bench.run(kind, settings, seed, test=True)
                if before is not None:
                    tuned = convert.save_checkpoint(this[kind]["model"], Path(tmp) / f"{kind}-1.safetensors")
                    this[kind]["routing"] = {"before": before, "after": routing(tuned, folder)}
                keep(this[kind])
            for options in args.also_static if "static" in args.kinds else []:
                other = grid_settings(options.split(","), True)[0]
                keep({**bench.run("static", other, seed, test=True), "kind": f"static [{other.label()}]"})
            if "static" in this and wall_kind in this:
                ratio = this[wall_kind]["epoch_seconds"] / this["static"]["epoch_seconds"]
                steps = max(this["static"]["steps"], round(this["static"]["steps"] * ratio))
                wall = bench.run("static", static, seed, steps=steps, test=True)
                keep({**wall, "kind": "static-wall", "wall_kind": wall_kind, "wall_ratio": ratio})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("sweep", "final", "report"))
    parser.add_argument("--data", type=Path, default=SYSTEM_DATA, help="folder with the Fashion-MNIST idx files")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dynconv-pays")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the JSON files and pays.md")
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--train-size", type=int, default=4000, help="subsample the training set (after val)")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--test-size", type=int, default=None, help="default: all 10,000")
    parser.add_argument("--base-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=["static", *KINDS])
    parser.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 entries (Settings fields or convert options)")
    parser.add_argument("--part", default="", help="sweep file suffix, for sweeps run in parallel processes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--use", nargs="*", default=[], help="KIND:key=v,key=v settings instead of the sweep's best")
    parser.add_argument("--also-static", nargs="*", default=[], help="key=v,key=v: more static arms (final)")
    parser.add_argument("--wall-kind", default=None, help="kind whose wall time (c) gets (default: best on val)")
    parser.add_argument("--routing-seed", type=int, default=0, help="the seed whose runs convert.analyze reads")
    parser.add_argument("--analyze-per-class", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="1: measured faster than 2 on a loaded machine")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mode == "report":
        committed = args.results.resolve() == RESULTS_DIR.resolve()  # only the committed records feed `dynconv kinds`
        write_report(args.results, MEASURED if committed else args.results / "measured.py")
        return 0
    try:
        bench = Bench(args)
    except MissingDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    (sweep if args.mode == "sweep" else final)(bench, args)
    print(f"{args.mode} done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
