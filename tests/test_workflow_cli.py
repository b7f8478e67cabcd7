"""Issue 13 on the command line: --num-classes on convert and finetune, finetune --model, selection
messages and plans, and output that reads well on an 80-column terminal."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import convert
from convert.cli.render import plain

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runner import run  # noqa: E402
from digits import write_digits  # noqa: E402


def one_error(result, code: int = 2) -> str:
    """The one ``error:`` line of a failed command (and nothing else on stderr)."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("data") / "digits", size=32, limit=120)


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory) -> Path:
    """A 1000-class resnet18 converted at 32x32 (what a user has before fine-tuning on their classes)."""
    path = tmp_path_factory.mktemp("ckpt") / "r18.safetensors"
    some = ("--include", "layer2.*", "--include", "layer3.*")  # enough layers to show, quick to convert
    result = run("convert", "resnet18", "-k", 2, "--input-size", 32, "-o", path, *some)
    assert result.exit_code == 0, result.stderr
    return path


def test_convert_num_classes_inspect_and_verify(weights, tmp_path) -> None:
    out = tmp_path / "r18-10.safetensors"
    args = ("--weights", weights, "--num-classes", 10, "--input-size", 64, "--include", "layer3.*", "-o", out)
    done = run("convert", "resnet18", *args)
    assert done.exit_code == 0, done.stderr
    assert "new head" in done.stdout and "10 classes" in done.stdout and "— ok" in done.stdout
    assert "new head" in run("inspect", out).stdout
    # the original gets the checkpoint's head for the comparison: without it this would be out of tolerance
    verified = run("verify", out, "--weights", weights)
    assert verified.exit_code == 0 and "checkpoint's" in verified.stdout, verified.stderr
    assert "--num-classes must be at least 1" in one_error(run("convert", "resnet18", "--num-classes", 0))


def test_finetune_num_classes_on_a_1000_class_checkpoint(imagenet_checkpoint, digits, tmp_path) -> None:
    common = ("--epochs", 1, "--batch-size", 16, "--max-steps", 2)
    out = tmp_path / "ft.safetensors"
    refused = one_error(run("finetune", imagenet_checkpoint, digits, "-o", out, *common))
    assert "predicts 1000 classes but" in refused and refused.endswith("(--num-classes 10)")
    wrong = one_error(run("finetune", imagenet_checkpoint, digits, "-o", out, "--num-classes", 3, *common))
    assert "a head for 3 classes was asked for" in wrong and "has 10 classes" in wrong
    assert not out.exists()
    done = run("finetune", imagenet_checkpoint, digits, "-o", out, "--num-classes", 10, *common)
    assert done.exit_code == 0, done.stderr
    assert convert.read_metadata(out)["head"] == {"num_classes": 10, "layers": ["fc"]}
    with torch.no_grad():
        assert convert.load_checkpoint(out)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    resumed = run("finetune", imagenet_checkpoint, digits, "-o", out, "--num-classes", 10, "--resume", *common)
    assert resumed.exit_code == 0 and "epoch 1/1" not in resumed.stdout.split("wrote")[0]  # already at epoch 1 of 1


def test_finetune_takes_model_for_a_custom_checkpoint(digits, tmp_path) -> None:
    ckpt = tmp_path / "small.safetensors"
    done = run("convert", "cli_models:small_classifier", "--num-classes", 10, "--input-size", 32, "-o", ckpt)
    assert done.exit_code == 0, done.stderr
    out = tmp_path / "small-ft.safetensors"
    common = ("--epochs", 1, "--batch-size", 16, "--max-steps", 2, "-o", out)
    refused = one_error(run("finetune", ckpt, digits, *common))
    assert "custom model" in refused and refused.endswith("(--model package.module:factory)")
    done = run("finetune", ckpt, digits, "--model", "cli_models:small_classifier", *common)
    assert done.exit_code == 0, done.stderr
    from cli_models import small_classifier

    with torch.no_grad():
        assert convert.load_checkpoint(out, model=small_classifier())(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_a_conversion_that_converts_nothing_exits_2_and_writes_nothing(tmp_path) -> None:
    args = ("convert", "resnet18", "--include", "layer4.*", "--exclude", "layer4.*", "--input-size", 32)
    line = one_error(run(*args, cwd=tmp_path))
    assert "no conv would be converted: all 20 are left static" in line and "5 excluded by pattern" in line
    assert list(tmp_path.iterdir()) == []


def test_include_glob_plan_lists_default_skips_and_how_to_force(tmp_path) -> None:
    done = run("convert", "efficientnet_b0", "--include", "features.5.*", "--input-size", 64, "--dry-run")
    assert done.exit_code == 0, done.stderr
    assert "Converted layers (9, condconv" in done.stdout and "squeeze-excite" in done.stdout
    prose = " ".join(done.stdout.split())
    assert "name it exactly with --include NAME, or use a recipe rule with skip: false" in prose
    grouped = run("convert", "mobilenet_v3_small", "--input-size", 64, "--dry-run", "--no-verify")
    assert re.search(r"Converted layers \(\d\d, condconv(, 4 experts)?, one row per block\)", grouped.stdout)


def test_probe_size_warning_and_recipe_rule_counts_in_the_dry_run_plan(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "rules:\n  - match: {name: 'layer1.*'}\n    experts: 3\n  - match: {type: depthwise}\n    skip: true\n"
    )
    args = ("--recipe", recipe, "--input-size", 32, "--include", "layer4.*", "--dry-run")
    done = run("convert", "resnet18", *args, "--no-verify")
    assert done.exit_code == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "layer4.0.conv2, layer4.1.conv1, layer4.1.conv2" in warnings[0]
    assert warnings[0].endswith("(--input-size)") and "recipe rule 1 (type=depthwise) matches no conv" in warnings[1]
    assert "shrunk" in done.stdout and "squeeze-excite" not in done.stdout
    assert "Recipe rules" in done.stdout
    assert re.search(r"│ +0 │ name=layer1\.\* +│ experts=3 +│ +4 │", done.stdout), done.stdout
    plan = json.loads(run("convert", "resnet18", *args, "--json").stdout)
    assert [r["convs"] for r in plan["rules"]] == [4, 0] and len(plan["warnings"]) == 2
    recipe.write_text("rules:\n  - match: {name: 'layer5.*'}\n    skip: true\n  - match: {name: 'layr1.*'}\n")
    line = one_error(run("convert", "resnet18", "--recipe", recipe, "--input-size", 32, "--dry-run"))
    assert "rule 0 pattern 'layer5.*'" in line and "rule 1 pattern 'layr1.*'" in line and "rule 0 0, rule 1 0" in line


def test_inspect_at_80_columns_keeps_names_whole(imagenet_checkpoint) -> None:
    shown = run("inspect", imagenet_checkpoint).stdout
    lines = shown.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    for name in ("layer2.0.downsample.0", "layer3.1.conv2"):
        assert any(f" {name} " in line for line in lines), name


def test_help_kinds_and_did_you_mean_read_cleanly() -> None:
    for command in ("convert", "finetune", "export"):
        text = run(command, "--help").stdout
        assert not re.search(r"--no-(no-verify|force|dry-run|pretrained|resume)", text), command
        assert "`" not in text, command
    assert "--no-verify" in run("convert", "--help").stdout
    assert "`" not in run("--help").stdout  # command help shows no docstring markup
    kinds = run("kinds")
    assert kinds.exit_code == 0 and "condconv" in kinds.stdout
    assert not re.search(r"``|:[a-z]+:`|\*\*", kinds.stdout)
    assert plain("``W(x)`` via :class:`~dynconv.CondConv2d`, **exact**") == "W(x) via dynconv.CondConv2d, exact"
    line = one_error(run("convert", "resnet1"))
    names = line.split("Did you mean: ", 1)[1].rstrip("?").split(", ")
    assert "resnet18" in names and len(names) == len(set(names))
