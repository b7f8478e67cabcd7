"""Issue 23: checkpoint format 3 (one router GEMM per ODConv/DCD layer) still loads format-2 files.

The files in tests/data/format2 were written by the format-2 code (see write.py there): ODConv
and DCD conversions of a small custom model, routers moved off zero. They must load with the
current code, compute what they computed then, and save again as format 3 with the same output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_convert_api import TinyNet

import convert
from convert import checkpoint as checkpoint_module

DATA = Path(__file__).parent / "data" / "format2"


@pytest.mark.parametrize("kind", ["odconv", "dcd"])
def test_a_format_2_checkpoint_loads_and_computes_what_it_did(kind: str, tmp_path) -> None:
    path = DATA / f"{kind}.safetensors"
    assert convert.read_metadata(path)["format_version"] == 2
    old_names = convert.checkpoint.tensor_shapes(path)
    legacy = {"odconv": ".router.kernel.weight", "dcd": ".router.phi_head.weight"}[kind]
    assert any(name.endswith(legacy) for name in old_names)  # the file really has the old layout
    expected = load_file(str(DATA / "expected.safetensors"))
    model = convert.load_checkpoint(path, model=TinyNet())
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input"]), expected[kind], rtol=0, atol=1e-6)
    again = convert.save_checkpoint(model, tmp_path / f"{kind}.safetensors")
    assert convert.read_metadata(again)["format_version"] == checkpoint_module.FORMAT_VERSION == 3
    names = convert.checkpoint.tensor_shapes(again)
    assert not any(name.endswith(legacy) for name in names)
    assert any(name.endswith(".router.head.weight") for name in names)
    reloaded = convert.load_checkpoint(again, model=TinyNet())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(expected["input"]), expected[kind], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kind", "experts", "gemms"), [("odconv", 1, 2), ("odconv", 4, 3), ("dcd", None, 3)])
def test_a_router_computes_its_heads_with_one_gemm_per_activation(kind: str, experts, gemms: int, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    options = {} if experts is None else {"experts": experts}
    result = convert.convert_model(TinyNet().eval(), kind=kind, input_size=16, **options)
    path = convert.export_onnx(result.model, tmp_path / f"{kind}.onnx", batch=1, input_shape=(3, 16, 16)).path
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # per layer: the router's hidden layer, then one GEMM per run of heads with the same activation (ODConv's
    # three sigmoid attentions: one GEMM and one Sigmoid, which ONNX Runtime fuses; format 2 had one per head);
    # plus TinyNet's classifier
    # (the exporter may fold DCD's depthwise Phi, all zero at conversion: at most that many there)
    assert len(result.layers) == 3 and gemms * 3 + 1 - (kind == "dcd") <= ops.count("Gemm") <= gemms * 3 + 1, ops
    assert ops.count("Sigmoid") == 3 + 1  # one per layer, and TinyNet's gate
    assert "Div" not in ops  # the temperature is folded into the constant weights


def test_an_old_state_dict_loads_into_a_copy_of_a_new_model() -> None:
    import copy

    old = load_file(str(DATA / "odconv.safetensors"))  # format 2's tensor names, e.g. body.0.router.kernel.weight
    expected = load_file(str(DATA / "expected.safetensors"))
    model = copy.deepcopy(convert.load_checkpoint(DATA / "odconv.safetensors", model=TinyNet()))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(old, strict=True)  # the copy's own hook stacks the heads
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input"]), expected["odconv"], rtol=0, atol=1e-6)
