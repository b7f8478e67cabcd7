"""Fine-tuning converted models on real data (scikit-learn digits): unchanged accuracy at conversion,
loss going down, exact resume, DistributedDataParallel under torchrun, SyncBatchNorm conversion."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

import convert
import dynconv
from convert.cli import app
from convert.finetune import TrainConfig, evaluate, image_folder_splits, train_model
from convert.finetune.state import TrainingState, read_sidecar, sidecar_path, write_sidecar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits import write_digits  # noqa: E402


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("data") / "digits", size=32, limit=600)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A static ResNet-18 trained briefly on the digits, and its DyConv conversion on disk."""
    train_set, val_set, classes = image_folder_splits(digits, 32, 0.2, seed=0, augment=False)
    torch.manual_seed(0)
    static = convert.build_model("resnet18", num_classes=classes)
    train_model(static, train_set, val_set, TrainConfig(epochs=3, lr=0.05, batch_size=32, warmup_epochs=0))
    result = convert.convert_model(static, kind="dyconv", experts=4, input_size=32)
    path = convert.save_checkpoint(result, tmp_path_factory.mktemp("ckpt") / "digits-dyconv.safetensors")
    return static.eval(), result, path, val_set


def test_accuracy_unchanged_by_conversion(trained) -> None:
    static, result, _, val_set = trained
    loader = DataLoader(val_set, batch_size=128)
    loss_s, acc_s, pred_s = evaluate(static, loader)
    loss_c, acc_c, pred_c = evaluate(result.model, loader)
    assert acc_s > 0.3, "the static model did not learn: the comparison would say little"
    assert torch.equal(pred_s, pred_c) and acc_s == acc_c
    assert abs(loss_s - loss_c) <= 1e-4 * loss_s


def _finetune(*args: object) -> object:
    result = CliRunner().invoke(app, ["finetune", *map(str, args)])
    assert result.exit_code == 0, result.stderr
    return result


def test_cli_finetune_lowers_the_loss_and_writes_a_loadable_checkpoint(trained, digits, tmp_path) -> None:
    _, _, path, _ = trained
    out = tmp_path / "ft.safetensors"
    args = ("--epochs", 2, "--lr", 0.01, "--batch-size", 32, "--temperature-epochs", 1, "--max-steps", 8)
    shown = _finetune(path, digits, "--output", out, *args, "--sched", "none", "--warmup-epochs", 0)
    assert "epoch 2/2: train loss" in shown.stdout and f"wrote {out}" in shown.stdout
    info, tensors = convert.checkpoint.read_training_state(out)
    history = info["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["temperature"] == 1.0 and not tensors  # annealed; no optimizer state in the model file
    state = read_sidecar(sidecar_path(out))
    assert state.section("optim") and state.info["run"] == info["run"]  # momentum buffers in the sidecar
    model = convert.load_checkpoint(out)
    assert sum(isinstance(m, dynconv.DyConv2d) for m in model.modules()) == len(trained[1].layers) == 16
    # (at 32x32, layer4's 3x3 convs see 1x1 maps: left static by the default selection)


def test_resume_continues_exactly(trained, digits, tmp_path) -> None:
    _, _, path, _ = trained
    common = ("--lr", 0.05, "--batch-size", 32, "--max-steps", 4, "--temperature-epochs", 2, "--sched", "none")
    straight, resumed = tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors"
    _finetune(path, digits, "--output", straight, "--epochs", 2, *common)
    _finetune(path, digits, "--output", resumed, "--epochs", 1, *common)
    state = read_sidecar(sidecar_path(resumed))  # as a run started before these settings existed wrote it
    for added in ("calibrate_routing", "augment", "crop_min"):
        del state.info["config"][added]
    write_sidecar(sidecar_path(resumed), state)
    again = [path, digits, "-o", resumed, "--resume", "--crop-min", 0.5, *common]
    refused = CliRunner().invoke(app, ["finetune", *map(str, again)])
    assert refused.exit_code == 2 and "other settings (crop_min=0.08)" in refused.stderr, refused.stderr
    misfit = copy.deepcopy(state.info)  # an optimizer state whose groups are not this model's parameters
    misfit["optimizer"]["param_groups"][0]["params"] = misfit["optimizer"]["param_groups"][0]["params"][:-1]
    write_sidecar(sidecar_path(resumed), TrainingState(misfit, state.tensors))
    refused = CliRunner().invoke(app, ["finetune", *map(str, [path, digits, "-o", resumed, "--resume", *common])])
    assert refused.exit_code == 2 and "so the run cannot resume" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1
    write_sidecar(sidecar_path(resumed), state)
    _finetune(path, digits, "--output", resumed, "--epochs", 2, "--resume", *common)
    a = convert.load_checkpoint(straight).state_dict()
    b = convert.load_checkpoint(resumed).state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert convert.checkpoint.read_training_state(resumed)[0]["epoch"] == 2


def test_finetune_errors_are_one_sentence(trained, digits, tmp_path) -> None:
    _, _, path, _ = trained
    runner = CliRunner()
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep")
    for args, message in [
        ([path, digits, "--output", existing], "already exists"),
        ([path, tmp_path / "nodata", "--output", tmp_path / "x.safetensors"], "does not exist"),
        ([path, digits, "--output", tmp_path / "fresh.safetensors", "--resume"], "without --resume"),
    ]:
        result = runner.invoke(app, ["finetune", *map(str, args)])
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert existing.read_bytes() == b"keep"


def test_data_parallel_under_torchrun_keeps_replicas_identical(trained, digits, tmp_path) -> None:
    """Two real processes (gloo): replicas are checked identical every epoch; rank 0's checkpoint loads."""
    _, _, path, _ = trained
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29571",
        "-m",
        "convert.cli",
        "finetune",
        str(path),
        str(digits),
        "--output",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--max-steps",
        "3",
        "--lr",
        "0.05",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info, _ = convert.checkpoint.read_training_state(out)
    assert info["epoch"] == 2
    model = convert.load_checkpoint(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_sync_batchnorm_conversion_keeps_the_dynamic_layers(trained) -> None:
    _, result, _, _ = trained
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(result.model)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == 20
    assert len(dynconv.dynamic_layers(synced)) == len(result.layers)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(synced.eval()(x), result.model.eval()(x))


def test_router_warmup_trains_only_the_routers(trained, digits) -> None:
    model = copy.deepcopy(trained[1].model)
    train_set, val_set, _ = image_folder_splits(digits, 32, 0.2, seed=0)
    routers_before = [p.detach().clone() for p in dynconv.router_parameters(model)]
    others_before = [p.detach().clone() for p in dynconv.other_parameters(model)]
    experts_before = [p.detach().clone() for p in dynconv.expert_parameters(model)]
    train_model(
        model,
        train_set,
        val_set,
        TrainConfig(epochs=1, router_warmup_epochs=1, max_steps_per_epoch=3, batch_size=16, lr=0.05),
    )
    assert any(not torch.equal(a, p) for a, p in zip(routers_before, dynconv.router_parameters(model), strict=True))
    assert all(torch.equal(a, p) for a, p in zip(experts_before, dynconv.expert_parameters(model), strict=True))
    assert all(torch.equal(a, p) for a, p in zip(others_before, dynconv.other_parameters(model), strict=True))
