"""Issue 21.6: the README's own training loop (dynconv.parameter_groups with timm's factories) runs
as printed, and the same TrainConfig drives the Python API."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import convert
from convert.finetune import TrainConfig, finetune, image_folder_splits
from convert.finetune.state import sidecar_path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits import write_digits  # noqa: E402


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.S).group(1)


def test_the_readme_own_loop_runs_and_the_api_takes_the_same_config(tmp_path) -> None:
    write_digits(tmp_path / "digits", size=32, limit=60)
    torch.manual_seed(0)
    base = convert.build_model("tf_mobilenetv3_small_minimal_100", num_classes=10)
    result = convert.convert_model(base, kind="dyconv", experts=2, input_size=32)
    convert.save_checkpoint(result, tmp_path / "resnet18-dyconv-4e.safetensors")  # the README's file name
    train_set, _, _ = image_folder_splits(tmp_path / "digits", None, 0.1, 0, augment=False)
    loader = DataLoader(train_set, batch_size=8)
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(readme_block("test:own-loop"), "README.md", "exec"), {"loader": loader})
    finally:
        os.chdir(old)
    tuned = convert.load_checkpoint(tmp_path / "resnet18-dyconv-4e-finetuned.safetensors")
    before = result.model.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in tuned.state_dict().items())

    config = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2, opt="adamw", lr=1e-3, sched="none")
    run = finetune(
        tmp_path / "resnet18-dyconv-4e.safetensors", tmp_path / "digits", tmp_path / "api.safetensors", config
    )
    assert (
        run.epoch == 1 and convert.read_metadata(tmp_path / "api.safetensors")["training"]["config"]["opt"] == "adamw"
    )
    assert sidecar_path(tmp_path / "api.safetensors").exists()


def test_the_training_crop_can_be_gentler_or_off_for_small_images(tmp_path) -> None:
    """``crop_min`` is timm's random-resized-crop ``scale`` floor; ``augment=False`` trains on the eval transform."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from typer.testing import CliRunner

    from convert.cli import app

    root = write_digits(tmp_path / "digits", size=32, limit=40)
    gentle, _, _ = image_folder_splits(root, 32, 0.1, 0, crop_min=0.6)
    crops = [t for t in gentle.dataset.transform.transforms if isinstance(t, RandomResizedCropAndInterpolation)]
    assert len(crops) == 1 and crops[0].scale == (0.6, 1.0)
    plain, val, _ = image_folder_splits(root, 32, 0.1, 0, augment=False)
    assert plain.dataset.transform is val.dataset.transform
    path = tmp_path / "fake.safetensors"
    refused = CliRunner().invoke(app, ["finetune", str(path), str(root), "--crop-min", "0"])
    assert refused.exit_code == 2 and "--crop-min is an area share in (0, 1], got 0.0" in refused.stderr
