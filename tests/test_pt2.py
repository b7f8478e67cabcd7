"""Converted models in PyTorch's compiler stack, with no dynconv context: torch.export with a
dynamic batch, torch.fx (create_feature_extractor, BatchNorm folding), torch.compile(dynamic=True)."""

from __future__ import annotations

import pytest
import torch
from deploy_models import batch, compare_arrays, routing_varies
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import convert
import dynconv
from convert.folding import fold_batchnorm
from convert.verify import signal_preserving_init


def converted(name: str, kind: str = "condconv") -> nn.Module:
    """``name`` (seeded, signal-preserving) converted at 64x64, routers moved off zero."""
    torch.manual_seed(0)
    model = convert.convert_model(signal_preserving_init(convert.build_model(name)).eval(), kind=kind, input_size=64)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in dynconv.dynamic_layers(model.model).values():
            for fc in layer.router.modules():
                if isinstance(fc, nn.Linear):
                    fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) / fc.in_features**0.5)
    return model.model.eval()


@pytest.mark.parametrize(
    ("name", "kind"), [("resnet18", "condconv"), ("mobilenet_v3_large", "dyconv"), ("tf_efficientnet_b0", "dynet")]
)
def test_torch_export_with_a_dynamic_batch_matches_eager(name, kind) -> None:
    model = converted(name, kind)
    program = torch.export.export(model, (batch(2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    exported = program.module()
    for n in (1, 5):
        x = batch(n)
        assert n == 1 or routing_varies(model, x)
        with torch.no_grad():
            assert compare_arrays(exported(x), model(x)), (name, n)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_fx_feature_extractor_gives_the_eager_feature_maps(name) -> None:
    model = converted(name)
    for module in model.modules():  # in-place activations would overwrite the feature maps compared below
        if getattr(module, "inplace", False):
            module.inplace = False
    traced = torch.fx.symbolic_trace(model)
    x = batch(3)
    with torch.no_grad():
        assert compare_arrays(traced(x), model(x))
    modules = dict(model.named_modules())
    leaves = [n for n in get_graph_node_names(model)[1] if n in modules]  # module outputs: eager values by hooks
    taken = {"mid": leaves[len(leaves) // 2], "late": leaves[-3]}
    extractor = create_feature_extractor(model, return_nodes={node: key for key, node in taken.items()})
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        modules[node].register_forward_hook(lambda m, i, o, key=key: captured.__setitem__(key, o.clone()))
        for key, node in taken.items()
    ]
    with torch.no_grad():
        features = extractor(x)
        model(x)
    for h in hooks:
        h.remove()
    assert set(features) == set(captured) == set(taken)
    for key, value in captured.items():
        assert compare_arrays(features[key], value), key
    folded = fold_batchnorm(model)
    assert folded.folded and not folded.skipped
    with torch.no_grad():
        assert compare_arrays(folded.model(x), model(x))


def test_compile_with_a_dynamic_batch_has_no_graph_break_and_no_more_recompiles_than_static() -> None:
    from torch._dynamo.utils import counters

    static = signal_preserving_init(convert.build_model("resnet18")).eval()
    model = converted("resnet18")
    explanation = torch._dynamo.explain(model)(batch(3))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons

    def graphs_after_each_batch(m: nn.Module) -> list[int]:
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(m, dynamic=True, backend="eager")
        seen = []
        with torch.no_grad():
            for n in (1, 3, 16):
                assert compare_arrays(compiled(batch(n)), m(batch(n)))
                seen.append(counters["stats"]["unique_graphs"])
        return seen

    static_graphs, converted_graphs = graphs_after_each_batch(static), graphs_after_each_batch(model)
    # dynamo specialises batch 1 (and guards sizes in its own conv rules, for the static model
    # too): the converted model never compiles more often than the static one, and 3 and 16 share a graph
    assert converted_graphs[2] == converted_graphs[1], converted_graphs
    assert all(c <= s for c, s in zip(converted_graphs, static_graphs, strict=True)), (converted_graphs, static_graphs)


def _compiled_graph(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """The (single) graph dynamo captures for ``model(x)`` with a dynamic batch."""
    graphs = []

    def backend(gm: torch.fx.GraphModule, _inputs) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(model, dynamic=True, backend=backend)(x)
    assert len(graphs) == 1
    return graphs[0]


def _compiled_graph_code(model: nn.Module, x: torch.Tensor) -> str:
    return _compiled_graph(model, x).code


def test_compiled_inference_runs_the_core_as_one_opaque_op_and_training_traces_it() -> None:
    model = converted("resnet18")
    layers = len(dynconv.dynamic_layers(model))
    with torch.no_grad():
        code = _compiled_graph_code(model, batch(3))
    # inference: each dynamic layer is one dynconv.dynamic_conv2d call, run eagerly at its batch's best strategy;
    # the 1x1 ones on channels_last maps (inductor keeps a custom op's inputs in their traced layout)
    assert code.count("dynconv.dynamic_conv2d") == layers
    pointwise = sum(m.kernel_size == (1, 1) for m in dynconv.dynamic_layers(model).values())
    assert code.count("memory_format = torch.channels_last") == pointwise > 0
    with dynconv.core.record_strategies() as seen, torch.no_grad():
        torch.compile(model, dynamic=True, backend="eager")(batch(16))
    assert "grouped" in seen  # what eager picks at batch 16, not a batch-agnostic form
    # training: the core is traced (gradients flow through standard ops), no opaque op
    model.train()
    code = _compiled_graph_code(model, batch(3))
    assert "dynconv.dynamic_conv2d" not in code


def _inverted_residual_net(kind: str) -> nn.Module:
    """Three inverted-residual blocks converted to ``kind``, routing moved off zero (away from saturation)."""
    torch.manual_seed(0)
    blocks = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
    for _ in range(3):  # inverted residuals' convs: the depthwise ones call the core with kernel terms
        blocks += [nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU()]
        blocks += [nn.Conv2d(32, 16, 1), nn.ReLU()]
    model = convert.convert_model(nn.Sequential(*blocks).eval(), kind=kind, input_size=32).model.eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for fc in model.modules():
            if isinstance(fc, nn.Linear):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) * 0.3 / fc.in_features**0.5)
    return model


def test_compiled_odconv_inference_runs_kernel_terms_through_the_opaque_op() -> None:
    """ODConv's attentions reach the opaque op: traced, they took the batch-agnostic forms
    (MobileNetV2 at batch 16: 14.5x static; through the op about 2x)."""
    model = _inverted_residual_net("odconv")
    with torch.no_grad():
        code = _compiled_graph_code(model, batch(3, 32))
    assert code.count("dynconv.dynamic_conv2d") == len(dynconv.dynamic_layers(model)) == 9
    x = batch(16, 32)
    torch._dynamo.reset()
    with dynconv.core.record_strategies() as seen, torch.no_grad():
        out = torch.compile(model, dynamic=True, backend="eager")(x)
        assert compare_arrays(out, model(x))
    assert "grouped" in seen  # with kernel terms the maps stay contiguous: the depthwise layers fold the batch


def test_compiled_dcd_keeps_the_static_kernel_a_constant_conv() -> None:
    """Under torch.compile DCD traces its deployment form: ``W0`` a plain conv of the layer's own
    weight, ``Lambda`` and the low-rank term on the maps, for inductor to fuse; no per-sample kernel
    and no opaque op (behind it, EfficientNet-B0 paid a layout copy around every layer: 2.25x
    compiled static at batch 16, 1.57x in this form)."""
    model = _inverted_residual_net("dcd")
    layers = dynconv.dynamic_layers(model)
    with torch.no_grad():
        graph = _compiled_graph(model, batch(3, 32)).graph
    assert "dynconv.dynamic_conv2d" not in graph.python_code("self").src

    def source(node: torch.fx.Node) -> str:  # the graph input a conv's weight is read from (through W[0])
        while node.op != "placeholder":
            node = node.args[0]
        return node.target

    weights = [source(n.args[1]) for n in graph.nodes if n.target is torch.conv2d]
    for name in layers:  # each layer's own weight, a graph input (a constant to inductor), in one plain conv
        assert sum(w.endswith(f"modules_{name}_parameters_weight_") for w in weights) == 1, (name, weights)
    x = batch(16, 32)
    torch._dynamo.reset()
    with dynconv.core.record_strategies() as seen, torch.no_grad():
        out = torch.compile(model, dynamic=True, backend="eager")(x)
    assert set(seen) == {"decomposed"}
    with torch.no_grad():
        assert compare_arrays(out, model(x))
