"""Fine-tuning on timm's training stack through the installed ``dynconv`` script (issues 21 and 25):
the recorded preprocessing of a timm model whose mean/std are not ImageNet's, timm's optimizers,
schedules, mixup, AMP and EMA, a model file without training state beside a sidecar that has it,
a header and progress lines, Ctrl-C that says what was saved, and a run killed with SIGKILL that,
resumed, ends on the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import convert
from convert.checkpoint import checkpoint_preprocessing, read_metadata, tensor_shapes
from convert.finetune.state import read_sidecar, read_sidecar_info, sidecar_path

ROOT = Path(__file__).resolve().parent.parent
DYNCONV = Path(sys.executable).with_name("dynconv")
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits import write_digits  # noqa: E402

#: Every training option issue 21 names, at once, on 4 steps of 16 images per epoch.
OPTIONS = (
    *("--epochs", "2", "--batch-size", "16", "--max-steps", "4", "--save-every-steps", "1"),
    *("--opt", "adamw", "--lr", "0.002", "--weight-decay", "0.05", "--router-lr-scale", "3"),
    *("--sched", "cosine", "--warmup-epochs", "1", "--smoothing", "0.1", "--mixup", "0.2", "--clip-grad", "1.0"),
    *("--amp", "bf16", "--channels-last", "--model-ema", "--model-ema-decay", "0.5", "--log-every", "0"),
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def dynconv(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DYNCONV), *map(str, args)], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600
    )


def _default_sigint() -> None:
    """A shell's background job (``cmd &`` without job control) ignores SIGINT, and children inherit
    that; the run under test must get Ctrl-C as a terminal would deliver it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args: object, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(DYNCONV), *map(str, args)],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def wait_for_save_point(sidecar: Path, proc: subprocess.Popen, at: tuple[int, int]) -> None:
    """Poll the sidecar's header until the run has saved at ``(epoch, step)`` or later."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            info = read_sidecar_info(sidecar)
        except convert.checkpoint.CheckpointError:
            info = None  # between os.replace calls there is always a whole file; a read may race the rename
        if info is not None and (info["epoch"], info["step"]) >= at:
            return
        time.sleep(0.02)
    raise AssertionError("the run never reached the save point")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The digits folder and a DyConv conversion of timm's tf_mobilenetv3_small_minimal_100 (mean/std 0.5)."""
    root = tmp_path_factory.mktemp("timm-ft")
    write_digits(root / "digits", size=32, limit=200)
    torch.manual_seed(0)
    base = convert.build_model("tf_mobilenetv3_small_minimal_100", num_classes=10)
    result = convert.convert_model(base, kind="dyconv", experts=2, input_size=32)
    convert.save_checkpoint(result, root / "mb.safetensors")
    return root


@pytest.fixture(scope="module")
def straight(workdir) -> subprocess.CompletedProcess:
    """The uninterrupted run every other run is compared with."""
    done = dynconv("finetune", "mb.safetensors", "digits", "-o", "straight.safetensors", *OPTIONS, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_checkpoint_records_the_timm_preprocessing_and_finetune_uses_it(workdir, straight) -> None:
    recorded = read_metadata(workdir / "mb.safetensors")["preprocessing"]
    assert recorded["mean"] == [0.5, 0.5, 0.5] and recorded["std"] == [0.5, 0.5, 0.5] and recorded["source"] == "timm"
    assert recorded["input_size"] == [3, 32, 32]
    header = straight.stdout.splitlines()[:3]
    assert header[0] == "data: 180 training and 20 validation images, 10 classes"
    assert header[1].startswith(
        "input: 32x32, mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5], bilinear, crop 0.875 (from timm)"
    )
    assert header[2].startswith("4 steps per epoch, 2 epochs; layers: ")
    assert "temperature: dyconv 30 -> 1 over 40 steps" in header[2]
    # the evaluation transform normalises with 0.5/0.5: a white image becomes all ones
    prep = checkpoint_preprocessing(workdir / "mb.safetensors")
    white = convert.preprocessing.eval_transform(prep)(__import__("PIL.Image").Image.new("RGB", (32, 32), "white"))
    assert torch.allclose(white, torch.ones_like(white))


def test_timm_optimizer_schedule_amp_and_ema_drive_the_run(workdir, straight) -> None:
    lines = straight.stdout.splitlines()
    progress = [line for line in lines if " step " in line and line.startswith("epoch 1/2 step")]
    assert len(progress) == 4 and lines.index(progress[0]) > 2  # progress lines after the header, not a TTY
    assert any(line.startswith("epoch 2/2: train loss") and "EMA val acc" in line for line in lines)
    state = read_sidecar(sidecar_path(workdir / "straight.safetensors"))
    groups = state.info["optimizer"]["param_groups"]
    assert all("betas" in g for g in groups)  # AdamW
    for g in groups:  # dynconv.parameter_groups' per-layer multipliers, kept by timm's factory and schedule
        assert g["initial_lr"] == pytest.approx(0.002 * g["lr_multiplier"])
        decays = g["name"].endswith(" decay")
        assert g["weight_decay"] == (pytest.approx(0.05 / g["lr_multiplier"]) if decays else 0.0)  # timm's rule
    routers = [g for g in groups if g["name"].startswith("routers")]
    assert routers and {g["lr_multiplier"] for g in routers} == {3.0}  # AdamW: x1, then x --router-lr-scale
    assert all(g["lr"] < g["initial_lr"] for g in groups)  # cosine, stepped per update, is on its way down
    assert state.info["scheduler"]["t_initial"] == 8 and state.info["global_step"] == 8
    assert state.section("ema") and state.info["config"]["amp"] == "bf16"


def test_the_model_file_is_a_checkpoint_like_converts_and_the_state_is_in_the_sidecar(workdir, straight) -> None:
    out, source = workdir / "straight.safetensors", workdir / "mb.safetensors"
    assert not any(name.startswith("__training__") for name in tensor_shapes(out))
    assert out.stat().st_size < 1.05 * source.stat().st_size
    training = read_metadata(out)["training"]
    assert training["epoch"] == 2 and training["weights"] in ("raw", "ema") and len(training["history"]) == 2
    assert read_sidecar_info(sidecar_path(out))["run"] == training["run"]
    model = convert.load_checkpoint(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
    shown = dynconv("inspect", out.name, cwd=workdir)
    assert "fine-tuned" in shown.stdout and "training state" in shown.stdout and "resumable" in shown.stdout
    state = json.loads(dynconv("inspect", out.name, "--json", cwd=workdir).stdout)["training_state"]
    assert state == {"where": "straight.train.safetensors", "status": "resumable", "epoch": 2, "step": 0}


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(workdir, straight) -> None:
    out = workdir / "killed.safetensors"
    proc = start("finetune", "mb.safetensors", "digits", "-o", out.name, *OPTIONS, cwd=workdir)
    wait_for_save_point(sidecar_path(out), proc, (0, 2))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists() or convert.load_checkpoint(out) is not None  # never half-written
    resumed = dynconv("finetune", "mb.safetensors", "digits", "-o", out.name, *OPTIONS, "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 0, step" in resumed.stdout
    a = convert.load_checkpoint(workdir / "straight.safetensors").state_dict()
    b = convert.load_checkpoint(out).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    sa, sb = read_sidecar(sidecar_path(workdir / "straight.safetensors")), read_sidecar(sidecar_path(out))
    assert all(torch.equal(sa.tensors[k], sb.tensors[k]) for k in sa.tensors if not k.startswith("rng."))
    assert read_metadata(out)["training"]["history"][-1]["val_loss"] == json.loads(
        json.dumps(read_metadata(workdir / "straight.safetensors")["training"]["history"][-1]["val_loss"])
    )


def test_ctrl_c_says_what_was_saved_and_how_to_resume(workdir) -> None:
    out = workdir / "interrupted.safetensors"
    proc = start("finetune", "mb.safetensors", "digits", "-o", out.name, *OPTIONS, cwd=workdir)
    wait_for_save_point(sidecar_path(out), proc, (0, 1))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert "interrupted: saved epoch " in stderr and "training state in interrupted.train.safetensors" in stderr
    command = stderr.strip().splitlines()[-1].strip()
    assert command.startswith("dynconv finetune mb.safetensors digits --output interrupted.safetensors --epochs 2")
    assert command.endswith("--resume") and "--amp bf16" in command and "--model-ema" in command


def test_ctrl_c_before_any_save_point_says_nothing_was_saved(workdir) -> None:
    out = workdir / "early.safetensors"
    proc = start("finetune", "mb.safetensors", "digits", "-o", out.name, "--epochs", "1", cwd=workdir)
    assert proc.stdout.readline().startswith("data: ")  # the header comes before any step
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert "interrupted before the first save point: nothing was saved under early.safetensors" in stderr
    assert not out.exists() and not sidecar_path(out).exists()
    again = dynconv("finetune", "mb.safetensors", "digits", "-o", out.name, "--resume", cwd=workdir)
    assert again.returncode == 2 and "without --resume" in again.stderr and "does not exist" not in again.stderr
