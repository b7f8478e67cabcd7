"""Issue 22.2: routing that depends on the image from step 0 while the model computes the original's function.

``dynconv.calibrate_routing`` sets fresh routers from a calibration batch (softmax kinds: identical
experts, any routing mixes back to the same kernel; CondConv: experts in pairs whose logits are
``z`` and ``-z``). Checked on real digits: the function is unchanged, ``dynconv analyze``'s
metrics leave uniform at once, the experts separate at the first step, and fine-tuning then
moves the routing far more than from the uniform start.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import convert
import dynconv
from dynconv.calibration import DEFAULT_CALIBRATION_BATCHES, calibrate_routing, default_calibration_batches

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from routing_learns import digits, fine_tune, pretrained, routing_metrics

KINDS = ["condconv", "dyconv", "dynet", "odconv"]


@pytest.fixture(scope="module")
def task() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    images, labels = digits()
    return pretrained(images, labels).eval(), images[:600], labels[:600]


def converted(static: nn.Module, kind: str, **options) -> nn.Module:
    return convert.convert_model(static, kind=kind, input_size=8, seed=0, **options).model.eval()


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("kind", KINDS)
def test_calibrated_routing_keeps_the_function_and_varies_with_the_image(task, kind: str) -> None:
    static, images, labels = task
    model = converted(static, kind, experts=4)
    assert routing_metrics(model, images, labels) == (pytest.approx(1.0, abs=1e-9), 0.0)  # uniform
    report = calibrate_routing(model, [images[:128], images[128:256]])
    assert set(report.calibrated) == set(dynconv.dynamic_layers(model)) and not report.skipped
    assert report.samples == 256
    reference = logits(static, images)
    assert (logits(model, images) - reference).abs().max() <= 1e-5 * reference.abs().max()
    entropy, ratio = routing_metrics(model, images, labels)
    assert entropy < 0.97 and ratio > 0.1  # analyze's metrics: off uniform, and different per class


def test_condconv_pairs_keep_every_inputs_total_with_an_odd_expert_count(task) -> None:
    static, images, _ = task
    model = converted(static, "condconv", experts=5)
    calibrate_routing(model, [images[:200]])
    with torch.no_grad(), dynconv.capture_routing(model) as routing:
        model(images)
    for name, weights in routing.items():
        assert weights.std(0).max() > 0.01, name  # input-dependent
        torch.testing.assert_close(weights.sum(1), torch.full((len(images),), 2.5), atol=1e-6, rtol=0)
    assert (logits(model, images) - logits(static, images)).abs().max() < 1e-4


def test_shared_routers_are_calibrated_once_for_every_layer_that_uses_them() -> None:
    torch.manual_seed(0)
    base = convert.build_model("resnet18", num_classes=10).eval()
    result = convert.convert_model(base, kind="condconv", input_size=32, share_routing="block", exclude=["layer4.*"])
    model = result.model.eval()
    images = torch.randn(48, 3, 32, 32)
    routers = {id(layer.router) for layer in dynconv.dynamic_layers(model).values()}
    report = calibrate_routing(model, [images])
    assert len(report.calibrated) == len(dynconv.dynamic_layers(model)) > len(routers)
    reference = logits(base, images)
    assert (logits(model, images) - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_what_cannot_be_calibrated_is_left_as_it_is_and_said(task) -> None:
    static, images, _ = task
    dcd = converted(static, "dcd")
    report = calibrate_routing(dcd, [images[:64]])
    assert not report.calibrated and all(
        "no routing over experts" in why or "one expert" in why for why in report.skipped.values()
    )
    single = converted(static, "odconv", experts=1)
    assert all("one expert" in why for why in calibrate_routing(single, [images[:64]]).skipped.values())
    model = converted(static, "dyconv", experts=4)
    first, *_ = dynconv.dynamic_layers(model).values()
    with torch.no_grad():
        first.router.fc2.bias[0] = 0.5  # a router that has been trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = calibrate_routing(model, [images[:64]])
    name = next(iter(dynconv.dynamic_layers(model)))
    assert "already trained" in report.skipped[name] and name not in report.calibrated
    assert torch.equal(model.state_dict()[f"{name}.weight"], before[f"{name}.weight"])
    with pytest.raises(ValueError, match="spread must be positive"):
        calibrate_routing(model, [images[:8]], spread=0)
    with pytest.raises(ValueError, match="at least 2 images"):
        calibrate_routing(converted(static, "dyconv"), [images[:1]])


@pytest.mark.parametrize("kind", ["dyconv", "condconv"])
def test_the_experts_separate_at_the_first_step_and_the_routers_then_learn(task, kind: str) -> None:
    static, images, labels = task
    model = converted(static, kind, experts=4)
    calibrate_routing(model, [images[:256]])
    layer = next(iter(dynconv.dynamic_layers(model).values()))
    pair = layer.weight[0:2].detach()
    assert torch.equal(pair[0], pair[1])  # identical experts (a softmax bank, a CondConv pair)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(2):
        loss = nn.functional.cross_entropy(model(images[:64]), labels[:64])
        optimizer.zero_grad()
        loss.backward()
        if step == 1:  # the experts differ now, so the router's output head has a gradient
            assert layer.router.calibration_head().module.weight.grad.abs().max() > 0
        optimizer.step()
        if step == 0:
            assert (layer.weight[0] - layer.weight[1]).abs().max() > 0


@pytest.mark.parametrize("kind", ["dynet", "condconv"])
def test_fine_tuning_from_calibrated_routing_moves_it_far_more_than_from_uniform(task, kind: str) -> None:
    static, images, labels = task
    plain = fine_tune(static, kind, images, labels, 20, init="default")
    calibrated = fine_tune(static, kind, images, labels, 20, init="calibrated")
    assert calibrated["max_logit_change"] < 1e-4  # exact at step 0
    assert calibrated["entropy_after"] < calibrated["entropy"] < 0.97
    assert 1 - calibrated["entropy_after"] > 100 * (1 - plain["entropy_after"])


def test_finetune_calibrates_condconv_by_default_and_analyze_reads_the_routing_off_uniform(tmp_path) -> None:
    from digits import write_digits
    from typer.testing import CliRunner

    from convert.analyze import analyze
    from convert.cli import app
    from convert.finetune import TrainConfig, finetune

    data = write_digits(tmp_path / "digits", size=32, limit=80)
    torch.manual_seed(0)
    base = convert.build_model("resnet18", num_classes=10)
    result = convert.convert_model(base, kind="condconv", input_size=32, exclude=["layer3.*", "layer4.*"])
    checkpoint = convert.save_checkpoint(result, tmp_path / "condconv.safetensors")
    config = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=1, sched="none")  # CondConv's default
    finetune(checkpoint, data, tmp_path / "tuned.safetensors", config)
    recorded = convert.read_metadata(tmp_path / "tuned.safetensors")["training"]["config"]["calibrate_routing"]
    assert recorded == DEFAULT_CALIBRATION_BATCHES == 4
    uniform, tuned = analyze(checkpoint, data).layers, analyze(tmp_path / "tuned.safetensors", data).layers
    assert all(s.entropy == pytest.approx(1.0, abs=1e-9) and not s.class_ratio for s in uniform)
    entropies = [s.entropy for s in tuned]
    assert sum(entropies) / len(entropies) < 0.975 and max(entropies) < 0.995  # every layer off uniform
    assert min(s.class_ratio for s in tuned) > 0.05
    refused = CliRunner().invoke(app, ["finetune", str(checkpoint), str(data), "--calibrate-routing", "-1"])
    assert refused.exit_code == 2 and "--calibrate-routing is a number of batches" in refused.output
    assert not (tmp_path / "condconv-finetuned.safetensors").exists()


def test_a_layer_the_batches_never_reach_is_left_uniform_and_said(task) -> None:
    static, images, _ = task
    model = converted(static, "dynet", experts=4)
    first = next(iter(dynconv.dynamic_layers(model)))

    class WithAuxiliary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main, self.unused = model, copy.deepcopy(model)  # forward never calls ``unused``

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.main(x)

    report = calibrate_routing(WithAuxiliary(), [images[:64]])
    assert report.skipped[f"unused.{first}"] == "it did not run on the calibration batches"
    assert f"main.{first}" in report.calibrated


def test_calibration_by_default_follows_the_models_kinds(task) -> None:
    from convert.finetune import TrainConfig
    from convert.finetune.loop import with_calibration_default

    static, _, _ = task
    assert default_calibration_batches(["condconv"]) == DEFAULT_CALIBRATION_BATCHES
    assert default_calibration_batches(["condconv", "dyconv"]) == 0  # mixed: DyConv keeps its annealing
    assert default_calibration_batches(["dyconv"]) == default_calibration_batches([]) == 0
    for cls in dynconv.layers.LAYERS.values():  # calibration fixes the temperature at 1: no annealing kind may ask
        assert not (cls.calibrates_by_default and cls.temperature_annealing is not None), cls.kind
    defaults = TrainConfig()
    assert defaults.calibrate_routing is None
    condconv, dynet = converted(static, "condconv", experts=4), converted(static, "dynet", experts=4)
    assert with_calibration_default(defaults, condconv).calibrate_routing == 4
    assert with_calibration_default(defaults, dynet).calibrate_routing == 0
    assert with_calibration_default(defaults, static).calibrate_routing == 0
    assert with_calibration_default(TrainConfig(calibrate_routing=0), condconv).calibrate_routing == 0
    assert with_calibration_default(TrainConfig(calibrate_routing=2), dynet).calibrate_routing == 2
