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


def test_one_router_gemm_per_layer_in_the_exported_graph(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    for kind, options in (("odconv", {"experts": 4}), ("dcd", {})):
        torch.manual_seed(0)
        result = convert.convert_model(TinyNet().eval(), kind=kind, input_size=16, **options)
        path = convert.export_onnx(result.model, tmp_path / f"{kind}.onnx", batch=1, input_shape=(3, 16, 16)).path
        nodes = onnx.load(str(path)).graph.node
        gemms = [n for n in nodes if n.op_type == "Gemm"]
        # per layer the router's hidden layer and all its heads (format 2: up to five), plus TinyNet's classifier
        assert len(result.layers) == 3 and len(gemms) == 2 * 3 + 1, (kind, [n.name for n in gemms])


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
