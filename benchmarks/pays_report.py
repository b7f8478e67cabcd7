"""``benchmarks/results/pays.md`` from ``pays-sweep.json`` and ``pays-final*.json`` (a "## Reading" section is kept)."""

from __future__ import annotations

import json
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

from pays_loop import LOOP

#: ``convert.convert_model``'s kind when none is given: what the target is about.
DEFAULT_KIND = "condconv"
#: The module ``dynconv kinds`` reads the per-kind results from.
MEASURED = Path(__file__).resolve().parent.parent / "convert" / "measured.py"
#: Where the committed records are.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ORDER = ("static", "condconv", "dyconv", "dynet", "dcd", "odconv", "static-wall")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _points(acc: float) -> str:
    return f"{100 * acc:.2f}"


def label_of(record: dict) -> str:
    """The record's settings with the optimizer always named (the default optimizer changed in round 3)."""
    settings = record.get("settings") or {}
    rest = [w for w in record["label"].split() if w != "defaults" and not w.startswith("opt=")]
    return " ".join([settings.get("opt", "?"), *rest]) if settings else record["label"]


def final_records(results: Path) -> tuple[list[dict], dict | None]:
    """Every seed's records from ``pays-final*.json`` (one file per process) and the base model's info."""
    records, base = [], None
    for path in sorted(results.glob("pays-final*.json")):
        for r in json.loads(path.read_text()):
            if r["kind"] == "base":
                base = r
            else:
                records.append(r)
    return records, base


def by_kind_and_seed(records: list[dict]) -> dict[str, dict[int, dict]]:
    """``kind -> seed -> record``: the arms of a final run, each seed paired with static's."""
    grouped: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in records:
        grouped[r["kind"]][r["seed"]] = r
    return grouped


def final_table(records: list[dict]) -> list[str]:
    """Mean ± std test accuracy over seeds per arm, the paired difference to static, time per epoch."""
    by_kind = by_kind_and_seed(records)
    static = by_kind.get("static", {})
    lines = [
        "| model | settings | seeds | test accuracy % (mean ± std) | Δ vs static continued "
        "(paired mean ± std) | epochs | s / epoch | × static's time | max logit diff at conversion |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in sorted(by_kind, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER)):
        runs = by_kind[kind]
        acc, std = mean_std([r["test_acc"] for r in runs.values()])
        paired = [runs[s]["test_acc"] - static[s]["test_acc"] for s in runs if s in static]
        delta = "—" if kind == "static" else "{:+.2f} ± {:.2f}".format(*(100 * v for v in mean_std(paired)))
        seconds = statistics.fmean(r["epoch_seconds"] for r in runs.values())
        ratios = [r["epoch_seconds"] / static[s]["epoch_seconds"] for s, r in runs.items() if s in static]
        diffs = [r["max_diff"] for r in runs.values() if r.get("max_diff") is not None]
        diff = f"{max(diffs):.1e}" if diffs else "—"
        label = label_of(next(iter(runs.values())))
        if kind == "static-wall":
            label += f"; wall time of {next(iter(runs.values()))['wall_kind']}"
        epochs = statistics.fmean(r["epochs"] for r in runs.values())
        lines.append(
            f"| {kind} | {label} | {len(runs)} | {_points(acc)} ± {100 * std:.2f} | {delta} | {epochs:.2f} | "
            f"{seconds:.1f} | {statistics.fmean(ratios):.2f} | {diff} |"
        )
    return lines


def target_lines(records: list[dict], kind: str = DEFAULT_KIND) -> list[str]:
    """The issue's target for the default kind: ≥ 0.5 points over static, > 2σ, not beaten at equal wall time."""
    by = {(r["kind"], r["seed"]): r["test_acc"] for r in records}
    seeds = sorted(s for k, s in by if k == kind and ("static", s) in by)
    if not seeds:
        return []
    gain, gain_std = mean_std([by[(kind, s)] - by[("static", s)] for s in seeds])
    _, std_kind = mean_std([by[(kind, s)] for s in seeds])
    _, std_static = mean_std([by[("static", s)] for s in seeds])
    sigma = max(std_kind, std_static, gain_std)
    met = gain >= 0.005 and gain > 2 * sigma
    lines = [
        f"- {kind} (the default kind) vs static continued: {100 * gain:+.2f} points (paired std {100 * gain_std:.2f}; "
        f"seed std {100 * std_kind:.2f} vs {100 * std_static:.2f}). Target ≥ +0.50 and > 2σ = {200 * sigma:.2f}: "
        + ("**met**." if met else f"**missed**: {100 * (0.005 - gain):.2f} points short of +0.50 on the mean."),
    ]
    wall = [by[(kind, s)] - by[("static-wall", s)] for s in seeds if ("static-wall", s) in by]
    if wall:
        w, ws = mean_std(wall)
        lines.append(
            f"- {kind} vs static trained for the best converted run's wall time: {100 * w:+.2f} points "
            f"(paired std {100 * ws:.2f}): " + ("not beaten." if w >= 0 else "**beaten** by the static model.")
        )
    return lines


def kind_lines(records: list[dict], setup: dict) -> dict[str, str]:
    """Per kind, one sentence for ``dynconv kinds``: its test accuracy against static continued, and its cost."""
    by_kind = by_kind_and_seed(records)
    static = by_kind.get("static", {})
    lines = {}
    for kind, runs in by_kind.items():
        seeds = [s for s in runs if s in static]
        if kind.startswith("static") or not seeds:
            continue
        acc, std = mean_std([runs[s]["test_acc"] for s in seeds])
        base, base_std = mean_std([static[s]["test_acc"] for s in seeds])
        gain, gain_std = mean_std([runs[s]["test_acc"] - static[s]["test_acc"] for s in seeds])
        time = statistics.fmean(runs[s]["epoch_seconds"] / static[s]["epoch_seconds"] for s in seeds)
        lines[kind] = (
            f"Fashion-MNIST, {setup['model']} {setup['size']} px, {setup['train']} training images, "
            f"+{setup['epochs']} epoch(s), {len(seeds)} seeds, {label_of(runs[seeds[0]])} "
            f"(benchmarks/results/pays.md): test {_points(acc)} ± {100 * std:.2f} % vs static continued "
            f"{_points(base)} ± {100 * base_std:.2f} % ({100 * gain:+.2f} ± {100 * gain_std:.2f} points), "
            f"{time:.2f}x static's time per epoch"
        )
    return lines


#: Other final runs whose settings are today's defaults, also shown by ``dynconv kinds``: CondConv with
#: calibrated routing (its default since stop 29) on 20,000 training images.
DEFAULT_EXTRAS = ("pays-n20k",)


def extra_finals(results: Path) -> list[tuple[list[dict], dict]]:
    """``(records, setup)`` of the final runs in :data:`DEFAULT_EXTRAS` under ``results``."""
    finals = []
    for extra in (results / name for name in DEFAULT_EXTRAS if (results / name).is_dir()):
        more, extra_base = final_records(extra)
        if more and extra_base is not None:
            finals.append((more, extra_base["setup"]))
    return finals


def measured_module(records: list[dict], setup: dict, extras: list[tuple[list[dict], dict]] = ()) -> str:
    """The text of ``convert/measured.py``: what each kind bought on this benchmark, for ``dynconv kinds``;
    a kind also run in ``extras`` (other final runs) gets those sentences after its own, joined by "; also "."""
    texts = kind_lines(records, setup)
    for more, more_setup in extras:
        for kind, text in kind_lines(more, more_setup).items():
            texts[kind] = f"{texts[kind]}; also {text}" if kind in texts else text
    body = ""
    for kind, text in texts.items():
        chunks = textwrap.wrap(text, 90, drop_whitespace=False, break_on_hyphens=False)
        body += f'    "{kind}": (\n' + "".join(f'        "{c}"\n' for c in chunks) + "    ),\n"
    return (
        '"""What each kind bought on the "does it pay?" benchmark, shown by ``dynconv kinds``.\n\n'
        "Written by ``python benchmarks/pays.py report`` from the final records in benchmarks/results/\n"
        '(tests/test_pays.py checks the two agree); edit the benchmark, not this file.\n"""\n\n'
        f"PAYS: dict[str, str] = {{\n{body}}}\n"
    )


def routing_table(records: list[dict]) -> list[str]:
    """``convert.analyze`` numbers per kind, right after conversion → after fine-tuning (first seed)."""
    lines = [
        "| kind | layers | mean entropy (1 = uniform) | layers near uniform | class ratio mean | class ratio max | "
        "expert spread × conversion's |",
        "|---|---|---|---|---|---|---|",
    ]

    def pair(before: dict, after: dict, key: str, fmt: str) -> str:
        values = [before.get(key), after.get(key)]
        return " → ".join("—" if v is None else format(v, fmt) for v in values)

    for r in records:
        if "routing" not in r:
            continue
        b, a = r["routing"]["before"], r["routing"]["after"]
        if "error" in b or "error" in a:
            lines.append(f"| {r['kind']} | `convert.analyze` failed: {b.get('error') or a.get('error')} |||||| ")
            continue
        lines.append(
            f"| {r['kind']} | {a['layers']} | {pair(b, a, 'entropy', '.4f')} | {pair(b, a, 'near_uniform', 'd')} | "
            f"{pair(b, a, 'class_ratio_mean', '.3g')} | {pair(b, a, 'class_ratio_max', '.3g')} | "
            f"{pair(b, a, 'moved_mean', '.2f')} |"
        )
    return lines


def sweep_table(records: list[dict]) -> list[str]:
    """Every sweep run (validation accuracy, seed 0), best per kind and model in bold."""
    best: dict[tuple[str, str], float] = {}
    for r in records:
        key = (r["kind"], r["setup"]["model"])
        best[key] = max(best.get(key, 0.0), r["val_acc"])
    lines = [
        "| model | kind | settings | epochs | train images | val accuracy % | s / epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(
        records,
        key=lambda r: (r["setup"]["model"], ORDER.index(r["kind"]) if r["kind"] in ORDER else 99, -r["val_acc"]),
    )
    for r in ordered:
        acc = _points(r["val_acc"])
        acc = f"**{acc}**" if r["val_acc"] == best[(r["kind"], r["setup"]["model"])] else acc
        lines.append(
            f"| {r['setup']['model']} | {r['kind']} | {label_of(r)} | {r['epochs']:g} | {r['setup']['train']} | "
            f"{acc} | {r['epoch_seconds']:.1f} |"
        )
    return lines


def setup_difference(extra: dict | None, main: dict | None) -> list[str]:
    """A line naming how a sub-folder's run differs from the main one (training images, base model)."""
    if not extra or not main or extra.get("setup", {}).get("train") == main.get("setup", {}).get("train"):
        return []
    setup, info = extra["setup"], extra["info"]
    return [
        f"Another setup: {setup['train']} training images; the base trained {setup['base_epochs']} epochs on them "
        f"({_points(info['val_acc'])} % validation, {_points(info['test_acc'])} % test), then +{setup['epochs']} "
        "epoch(s) per arm.",
        "",
    ]


def write_report(results: Path, measured: Path | None = None) -> Path:
    """Render ``results/pays.md``, keeping its "## Reading" section; ``measured``: where the kinds' lines go."""
    out = results / "pays.md"
    reading = ""
    if out.is_file() and "\n## Reading" in out.read_text():
        reading = "## Reading" + out.read_text().split("\n## Reading", 1)[1]
    sweep = [r for path in sorted(results.glob("pays-sweep*.json")) for r in json.loads(path.read_text())]
    records, base = final_records(results)
    setup = (base or {}).get("setup") or (sweep[0]["setup"] if sweep else {})
    lines = ["# Does it pay? Static vs converted on Fashion-MNIST", ""]
    if setup:
        lines += [
            f"Model: torchvision `{setup['model']}` (random init, 10 classes) at {setup['size']}x{setup['size']} "
            f"(28x28 grey images resized once, replicated to 3 channels, ImageNet mean/std; random horizontal flips). "
            f"Training subsample: {setup['train']} images (seeded, from the 55,000 left after carving a "
            f"{setup['val']}-image validation split from the training set); test: {setup['test']} images. "
            f"{setup['threads']} thread per process.",
            "",
        ]
    if records:
        lines += [
            f"Fine-tuning: {setup['epochs']} epoch(s) from the base for every arm, batch 64, the same seeded order "
            "and flips for every arm of a seed; the loop is the benchmark's own on in-memory tensors "
            f"({LOOP}; 5% linear warm-up, then cosine to 0), the same for static and converted models. "
            "Each kind converted with `convert.convert_model(base, kind=..., seed=s)` (its default experts and "
            "noise) and trained with `dynconv.parameter_groups`' multipliers (the project's defaults). "
            "Static for equal wall time: static continued for as many steps as the default kind's run took "
            "time, measured in the same process. Timings: several single-thread processes ran at once on the "
            "2 shared cores (other sessions' tests ran too), so seconds per epoch are inflated and only "
            "ratios measured side by side mean anything.",
            "",
        ]
    if base:
        info = base["info"]
        lines += [
            f"Base (static) model: {setup['base_epochs']} epochs from scratch ({info['settings']}, batch 128), "
            f"validation {_points(info['val_acc'])} %, test {_points(info['test_acc'])} %, "
            f"{info['epoch_seconds']:.1f} s / epoch.",
            "",
        ]
    if records:
        lines += ["## Test accuracy, 3 seeds", "", *final_table(records), "", *target_lines(records), ""]
        lines += ["## Routing (`convert.analyze`, first seed): right after conversion → after fine-tuning", ""]
        lines += [*routing_table(records), ""]
    for extra in sorted(p for p in results.iterdir() if p.is_dir() and p.name.startswith("pays-")):
        more, extra_base = final_records(extra)
        if more:
            title = f"## Test accuracy, 3 seeds, `{extra.name}` (settings given with `--use`)"
            lines += [title, "", *setup_difference(extra_base, base), *final_table(more), "", *target_lines(more), ""]
            lines += [*routing_table(more), ""]
    if sweep:
        lines += ["## Settings tried (validation split, seed 0)", "", *sweep_table(sweep), ""]
    out.write_text("\n".join(lines) + ("\n" + reading if reading else ""))
    if records and setup and measured is not None:
        measured.write_text(measured_module(records, setup, extra_finals(results)))
    return out
