"""How a router's heads are computed, in ONNX Runtime at batch 1: per activation, per head, or in one product.

For each model and kind (DCD, ODConv 1x, ODConv 4x), the converted model is exported three
times from the same weights: as it is (format 3's ``SplitLinear``: one GEMM per run of heads
with the same activation, the sigmoid applied before the split), with one ``nn.Linear`` per
head (format 2), and with every head in one product split before the activations. The static
model and the three forms are timed in the same interleaved rounds, and each form is profiled
per op type with ORT's profiler.
Results go to ``benchmarks/results/router_gemm.md``.

    python benchmarks/router_gemm.py [--models mobilenet_v2,efficientnet_b0 --rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import time_rounds
from deploy import SIZE, op_profile, session, static_onnx

import convert
from dynconv.routing import SplitLinear

RESULTS = Path(__file__).parent / "results" / "router_gemm.md"
#: Router ops whose time the profile sums as "router ops".
ROUTER_OPS = ("FusedGemm", "Gemm", "Sigmoid", "Split", "Softmax", "Div")
KINDS = {
    "dcd": {"kind": "dcd"},
    "odconv1": {"kind": "odconv", "experts": 1},
    "odconv4": {"kind": "odconv", "experts": 4},
}


class HeadPerLinear(nn.Module):
    """A ``SplitLinear``'s heads as separate ``nn.Linear`` layers (format 2's layout), same weights and outputs."""

    def __init__(self, merged: SplitLinear) -> None:
        super().__init__()
        self.sigmoid = merged.sigmoid
        self.heads = nn.ModuleDict()
        for name, size in merged.sizes.items():
            linear = nn.Linear(merged.in_features, size)
            weight, bias = merged.rows(name)
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
            self.heads[name] = linear

    def forward(self, x: Tensor, divisor: Tensor | None = None) -> dict[str, Tensor]:
        out = {name: head(x) if divisor is None else head(x) / divisor for name, head in self.heads.items()}
        return {name: torch.sigmoid(v) if name in self.sigmoid else v for name, v in out.items()}


class OneProduct(nn.Module):
    """Every head in one product, divided, split, then each head's activation (this stop's first version)."""

    def __init__(self, merged: SplitLinear) -> None:
        super().__init__()
        self.merged = merged

    def forward(self, x: Tensor, divisor: Tensor | None = None) -> dict[str, Tensor]:
        out = nn.functional.linear(x, self.merged.weight, self.merged.bias)
        out = out if divisor is None else out / divisor
        parts = out.split(list(self.merged.sizes.values()), dim=1)
        heads = {name: parts[i] for i, name in enumerate(self.merged.sizes)}
        return {name: torch.sigmoid(v) if name in self.merged.sigmoid else v for name, v in heads.items()}


#: The router head forms compared (None: the layer as it is).
FORMS: dict[str, type[nn.Module] | None] = {
    "per activation": None,
    "per head": HeadPerLinear,
    "one product": OneProduct,
}


def with_heads(model: nn.Module, form: type[nn.Module]) -> nn.Module:
    """A copy of ``model`` whose routers compute their heads with ``form`` (same weights)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        head = getattr(module, "head", None)
        if isinstance(head, SplitLinear):
            module.head = form(head)
    return model


def routed(model: nn.Module) -> nn.Module:
    """Every router head away from zero (as after fine-tuning), so no export folds a constant routing."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SplitLinear):
                module.weight.copy_(0.05 * torch.randn(module.weight.shape, generator=gen))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows, profiles = [], []
    feed = {"input": torch.randn(1, 3, SIZE, SIZE).numpy()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            torch.manual_seed(0)
            static = getattr(torchvision.models, name)(num_classes=1000).eval()
            static_onnx(static, folder / f"{name}-static.onnx", 1)
            for kind in args.kinds.split(","):
                result = convert.convert_model(static, input_size=SIZE, **KINDS[kind])
                model = routed(result.model.eval())
                files = {"static": folder / f"{name}-static.onnx"}
                options = {"batch": 1, "input_shape": (3, SIZE, SIZE), "fold_bn": True, "overwrite": True}
                for label, form in FORMS.items():
                    files[label] = folder / f"{name}-{kind}-{label.replace(' ', '-')}.onnx"
                    convert.export_onnx(model if form is None else with_heads(model, form), files[label], **options)
                sessions = {label: session(path) for label, path in files.items()}
                calls = {label: (lambda s=s: s.run(None, feed)) for label, s in sessions.items()}
                ms = time_rounds(calls, args.rounds, 0.4)
                prof = {label: op_profile(path, feed) for label, path in files.items() if label != "static"}
                rows.append((name, kind, len(result.layers), ms))
                profiles.append((name, kind, prof))
                print(name, kind, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    minutes = (time.perf_counter() - start) / 60
    labels = list(FORMS)
    lines = [
        "# Router heads in ONNX Runtime at batch 1: a GEMM per activation (format 3), per head (format 2), one for all",
        "",
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.machine()}, 2 threads; {SIZE}x{SIZE}; "
        f"run took {minutes:.1f} min. Same weights in every form (router heads random, as after fine-tuning), "
        "BatchNorm folded. *per activation*: the router as it is now (ODConv's sigmoid attentions in one GEMM and "
        "one sigmoid, the kernel attention in another; DCD's two heads one GEMM each); *per head*: one "
        "`nn.Linear` per head (format 2); *one product*: every head in one GEMM, split, then each activation. "
        f"The static model and the three forms are timed in the same interleaved rounds (median of {args.rounds}); "
        "router ops = FusedGemm, Gemm, Sigmoid, Split, Softmax and Div from ORT's profiler (ms per run; they "
        "include the router's first layer).",
        "",
        "| model | kind | layers | static ms | "
        + " | ".join(f"{label} ms (/ static)" for label in labels)
        + " | "
        + " | ".join(f"router ops, {label}" for label in labels)
        + " |",
        "|---|---|---|---|" + "---|" * (2 * len(labels)),
    ]
    for (name, kind, layers, ms), (_, _, prof) in zip(rows, profiles, strict=True):
        cells = [f"{ms[label]:.3f} ({ms[label] / ms['static']:.2f}x)" for label in labels]
        cells += [f"{sum(prof[label].get(op, 0.0) for op in ROUTER_OPS):.2f}" for label in labels]
        lines.append(f"| {name} | {kind} | {layers} | {ms['static']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "ORT's profiler, ms per run per op type (ops above 0.05 ms in any form), per head / per activation /"]
    lines += ["one product:", ""]
    for name, kind, prof in profiles:
        ops = sorted(set().union(*prof.values()), key=lambda o: -prof["per head"].get(o, 0))
        shown = [o for o in ops if max(prof[label].get(o, 0) for label in labels) > 0.05]
        order = ("per head", "per activation", "one product")
        cells = ", ".join(f"{o} " + " / ".join(f"{prof[label].get(o, 0):.2f}" for label in order) for o in shown)
        totals = " / ".join(f"{sum(prof[label].values()):.2f}" for label in order)
        lines.append(f"- {name} {kind}: total {totals}; {cells}")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
