"""The dynconv CLI: convert -> inspect -> verify, JSON, and every user error (exit 2, one line)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run
from network import online

import convert

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "r18.safetensors"
    result = run(
        "convert",
        "resnet18",
        "--experts",
        2,
        "--kind",
        "dyconv",
        "--weights",
        weights,
        "--output",
        path,
        "--input-size",
        64,
    )
    assert result.exit_code == 0, result.stderr
    return path


def test_convert_shows_plan_and_writes(checkpoint, weights) -> None:
    assert checkpoint.is_file() and checkpoint.stat().st_size > 0
    meta = convert.read_metadata(checkpoint)
    assert meta["base"]["name"] == "resnet18" and len(meta["layers"]) == 19
    loaded = convert.load_checkpoint(checkpoint)
    original = convert.build_model("resnet18")
    convert.load_weights(original, weights)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (loaded(x) - original.eval()(x)).abs().max() <= 1e-4 * original(x).abs().max() + 1e-5


def test_convert_output_tables(weights, tmp_path) -> None:
    result = run(
        "convert", "resnet18", "--weights", weights, "--output", tmp_path / "a.safetensors", "--input-size", 64
    )
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    for piece in (
        "Converted layers (19, condconv",
        "layer4.1.conv2",
        "Skipped convs (1)",
        "stem: reads the image",
        "params",
        "MACs at 64x64",
        "max difference",
        "— ok",
        "a.safetensors (",
    ):
        assert piece in text, piece


def test_default_output_name_and_force(weights, tmp_path) -> None:
    args = ("convert", "resnet18", "--weights", weights, "--input-size", 64, "-k", 3)
    assert run(*args, cwd=tmp_path).exit_code == 0
    target = tmp_path / "resnet18-condconv-3e.safetensors"
    assert target.is_file()
    again = run(*args, cwd=tmp_path)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert run(*args, "--force", cwd=tmp_path).exit_code == 0


def test_dry_run_writes_nothing(weights, tmp_path) -> None:
    result = run("convert", "resnet18", "--weights", weights, "--dry-run", "--input-size", 64, cwd=tmp_path)
    assert result.exit_code == 0 and "dry run: nothing written" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_json_outputs(checkpoint, weights, tmp_path) -> None:
    conv = run("convert", "resnet18", "--weights", weights, "--dry-run", "--json", "--input-size", 64)
    data = json.loads(conv.stdout)
    assert data["dry_run"] and data["output"] is None and data["verification"]["ok"]
    assert len(data["layers"]) == 19 and data["totals"]["params_ratio"] > 1
    meta = json.loads(run("inspect", checkpoint, "--json").stdout)
    assert meta["base"]["name"] == "resnet18" and len(meta["layers"]) == 19
    assert meta["layers"][0]["weight_shape"] == [2, 64, 64, 3, 3]
    verified = json.loads(run("verify", checkpoint, "--weights", weights, "--json").stdout)
    assert verified["digest"] == "ok" and verified["comparison"]["ok"]


def test_inspect_and_verify_tables(checkpoint, weights) -> None:
    shown = run("inspect", checkpoint)
    assert shown.exit_code == 0
    assert "torchvision:resnet18" in shown.stdout and "sha256" in shown.stdout and "layer1.0.conv1" in shown.stdout
    verified = run("verify", checkpoint, "--weights", weights)
    assert verified.exit_code == 0 and "vs original weights" in verified.stdout


def test_verify_against_other_weights_fails_with_exit_1(checkpoint, tmp_path) -> None:
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(convert.build_model("resnet18").state_dict(), other)
    result = run("verify", checkpoint, "--weights", other)
    assert result.exit_code == 1
    assert "differs from the original model" in result.stderr and "Traceback" not in result.stderr


def test_convert_that_cannot_verify_exits_1_and_writes_nothing(tmp_path) -> None:
    sys.path.insert(0, str(TESTS))
    result = run("convert", "cli_models:noisy_net", "--input-size", 16, cwd=tmp_path)
    assert result.exit_code == 1
    assert "beyond the 1e-4 tolerance; nothing was written" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_custom_model_factory_and_verify_with_model(tmp_path) -> None:
    sys.path.insert(0, str(TESTS))
    out = tmp_path / "small.safetensors"
    assert run("convert", "cli_models:small_net", "--output", out, "--input-size", 16).exit_code == 0
    assert run("verify", out).exit_code == 2  # custom base: needs --model
    assert run("verify", out, "--model", "cli_models:small_net").exit_code == 0


def test_models_and_recipes_listings() -> None:
    listed = run("models", "resnet1*")
    assert listed.exit_code == 0
    lines = listed.stdout.splitlines()
    assert "torchvision  resnet18" in lines and "timm         resnet18" in lines
    assert run("models", "zzz-no-such*").exit_code == 2
    recipes = run("recipes")
    assert recipes.exit_code == 0
    for name in (
        "condconv-efficientnet_b0",
        "dyconv-resnet18",
        "dyconv-mobilenet_v2",
        "dynet-mobilenet_v2",
        "late-stages-resnet50",
    ):
        assert name in recipes.stdout


def test_shipped_recipe_by_name(tmp_path) -> None:
    result = run("convert", "--recipe", "dyconv-resnet18", "--input-size", 64, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == "resnet18" and {layer["kind"] for layer in data["layers"]} == {"dyconv"}


def _junk(tmp_path: Path) -> Path:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"\x00 not a weights file")
    return path


def _mobilenet_weights(tmp_path: Path) -> Path:
    path = tmp_path / "mbv3.pth"
    torch.save(convert.build_model("mobilenet_v3_small").state_dict(), path)
    return path


def _bad_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("defaults:\n  kind: dyconv\n  colour: red\n")
    return path


def _existing(tmp_path: Path) -> Path:
    path = tmp_path / "exists.safetensors"
    path.write_bytes(b"keep me")
    return path


ERRORS = [
    (lambda t: ["convert", "resnet1"], "unknown model 'resnet1'.*Did you mean"),
    (lambda t: ["convert", "resnet18", "--weights", t / "absent.pth"], "weights file .* does not exist"),
    (lambda t: ["convert", "resnet18", "--weights", _junk(t)], "cannot read weights file"),
    (lambda t: ["convert", "resnet18", "--weights", _mobilenet_weights(t)], "do not fit the model"),
    (
        lambda t: ["convert", "resnet18", "--recipe", _bad_recipe(t)],
        r"bad\.yaml, line 3: defaults\.colour: unknown key",
    ),
    (lambda t: ["convert", "resnet18", "--recipe", "no-such-recipe"], "recipe no-such-recipe not found"),
    (lambda t: ["convert", "resnet18", "--output", _existing(t)], "already exists; pass --force"),
    (lambda t: ["convert", "resnet18", "--experts", 0], "--experts must be at least 1"),
    (lambda t: ["convert", "resnet18", "--kind", "odconv2"], "unknown kind 'odconv2'"),
    (lambda t: ["convert", "resnet18", "--include", "layer9.*", "--input-size", 64], "matches no conv"),
    (lambda t: ["convert", "resnet18", "--output", t / "missing" / "x.safetensors"], "folder .* does not exist"),
    (
        lambda t: ["convert", "resnet18", "--input-size", 32, "--output", "/proc/dynconv-test.safetensors"],
        "cannot write to folder /proc|not writable",
    ),
    (lambda t: ["convert", "resnet18", "--weights", _junk(t), "--pretrained"], "choose one of --weights"),
    (lambda t: ["inspect", _junk(t)], "not a safetensors file"),
    (lambda t: ["verify", t / "absent.safetensors"], "does not exist"),
    (lambda t: ["convert"], "name a MODEL"),
]


@pytest.mark.parametrize(("make_args", "message"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_user_errors_exit_2_with_one_sentence(make_args, message, tmp_path) -> None:
    import re

    args = make_args(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run(*args, cwd=tmp_path)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "an error left or changed files"


def test_tampered_checkpoint_is_refused_by_verify(checkpoint, tmp_path) -> None:
    copy = tmp_path / "tampered.safetensors"
    data = bytearray(checkpoint.read_bytes())
    data[-3] ^= 0x55
    copy.write_bytes(bytes(data))
    result = run("verify", copy)
    assert result.exit_code == 2 and "digest does not match" in result.stderr


def test_debug_shows_the_traceback() -> None:
    result = run("convert", "resnet1", "--debug")
    assert result.exit_code != 0 and isinstance(result.exception, convert.ModelNotFoundError)


@pytest.mark.skipif(online("download.pytorch.org"), reason="this machine can download weights")
def test_pretrained_offline_is_one_sentence_suggesting_weights(tmp_path) -> None:
    result = run("convert", "resnet18", "--pretrained", cwd=tmp_path)
    assert result.exit_code == 2
    assert "offline" in result.stderr and "--weights FILE" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_installed_script_end_to_end(weights, tmp_path) -> None:
    exe = shutil.which("dynconv") or str(Path(sys.executable).parent / "dynconv")
    assert Path(exe).exists(), "the dynconv console script is not installed"
    out = tmp_path / "cli.safetensors"

    def call(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=tmp_path)

    done = call("convert", "resnet18", "--weights", weights, "--output", out, "--input-size", 64, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == str(out)
    assert call("inspect", out).returncode == 0
    verified = call("verify", out, "--weights", weights)
    assert verified.returncode == 0 and "ok" in verified.stdout
    bad = call("convert", "resnet1")
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown model") and "Traceback" not in bad.stderr
