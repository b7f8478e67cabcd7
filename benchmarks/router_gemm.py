"""One router GEMM per layer (checkpoint format 3) against one per head (format 2), in ONNX Runtime at batch 1.

For each model and kind (DCD, ODConv 1x, ODConv 4x), the converted model is exported twice
from the same weights: as it is (every head of a layer's router in one ``SplitLinear``: one
``Gemm``, one division by the temperature) and with each router's heads split back into one
``nn.Linear`` per head, as format 2 computed them. The static model and both forms are timed
in the same interleaved rounds, and each is profiled per op type with ORT's profiler.
Results go to ``benchmarks/results/router_gemm.md``.

    python benchmarks/router_gemm.py [--models mobilenet_v2,efficientnet_b0 --rounds 7]
"""

from __future__ import annotations

import argparse
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
KINDS = {
    "dcd": {"kind": "dcd"},
    "odconv1": {"kind": "odconv", "experts": 1},
    "odconv4": {"kind": "odconv", "experts": 4},
}


class HeadPerLinear(nn.Module):
    """A ``SplitLinear``'s heads as separate ``nn.Linear`` layers (format 2's layout), same weights and outputs."""

    def __init__(self, merged: SplitLinear) -> None:
        super().__init__()
        self.heads = nn.ModuleDict()
        for name, size in merged.sizes.items():
            linear = nn.Linear(merged.in_features, size)
            weight, bias = merged.rows(name)
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
            self.heads[name] = linear

    def forward(self, x: Tensor, divisor: Tensor | None = None) -> dict[str, Tensor]:
        return {name: head(x) if divisor is None else head(x) / divisor for name, head in self.heads.items()}


def split_heads(model: nn.Module) -> nn.Module:
    """``model`` with every router's ``SplitLinear`` replaced by :class:`HeadPerLinear` (in place)."""
    for module in list(model.modules()):
        head = getattr(module, "head", None)
        if isinstance(head, SplitLinear):
            module.head = HeadPerLinear(head)
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
                files["one GEMM"] = folder / f"{name}-{kind}-merged.onnx"
                files["GEMM per head"] = folder / f"{name}-{kind}-split.onnx"
                options = {"batch": 1, "input_shape": (3, SIZE, SIZE), "fold_bn": True, "overwrite": True}
                convert.export_onnx(model, files["one GEMM"], **options)
                convert.export_onnx(split_heads(model), files["GEMM per head"], **options)
                sessions = {label: session(path) for label, path in files.items()}
                calls = {label: (lambda s=s: s.run(None, feed)) for label, s in sessions.items()}
                ms = time_rounds(calls, args.rounds, 0.4)
                prof = {label: op_profile(path, feed) for label, path in files.items() if label != "static"}
                rows.append((name, kind, len(result.layers), ms))
                profiles.append((name, kind, prof))
                print(name, kind, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    minutes = (time.perf_counter() - start) / 60
    lines = [
        "# One router GEMM per layer (format 3) against one per head (format 2), ONNX Runtime batch 1",
        "",
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.machine()}, 2 threads; {SIZE}x{SIZE}; "
        f"run took {minutes:.1f} min. Same weights both ways (router heads random, as after fine-tuning), "
        f"BatchNorm folded; static, one GEMM and GEMM per head timed in the same interleaved rounds "
        f"(median of {args.rounds}).",
        "",
        "| model | kind | layers | static ms | one GEMM ms | GEMM per head ms | one GEMM / static | "
        "per head / static | saved ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, kind, layers, ms in rows:
        merged, split = ms["one GEMM"], ms["GEMM per head"]
        lines.append(
            f"| {name} | {kind} | {layers} | {ms['static']:.3f} | {merged:.3f} | {split:.3f} | "
            f"{merged / ms['static']:.2f}x | {split / ms['static']:.2f}x | {split - merged:.3f} |"
        )
    lines += ["", "ORT's profiler, ms per run per op type (ops above 0.05 ms in either form):", ""]
    for name, kind, prof in profiles:
        ops = sorted(set(prof["one GEMM"]) | set(prof["GEMM per head"]), key=lambda o: -prof["GEMM per head"].get(o, 0))
        shown = [o for o in ops if max(prof["one GEMM"].get(o, 0), prof["GEMM per head"].get(o, 0)) > 0.05]
        cells = ", ".join(
            f"{o} {prof['GEMM per head'].get(o, 0):.2f} → {prof['one GEMM'].get(o, 0):.2f}" for o in shown
        )
        total = (sum(prof["GEMM per head"].values()), sum(prof["one GEMM"].values()))
        lines.append(f"- {name} {kind} (per head → one GEMM): total {total[0]:.2f} → {total[1]:.2f}; {cells}")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
