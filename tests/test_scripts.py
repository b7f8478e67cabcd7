"""The hand-run scripts still work: a one-model zoo sweep writes its table; offline pretrained fails clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from network import online

import convert

ROOT = Path(__file__).resolve().parent.parent


def test_zoo_script_on_one_model(tmp_path: Path) -> None:
    out = tmp_path / "zoo.md"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/zoo.py",
            "--models",
            "torchvision:mobilenet_v3_small",
            "--kinds",
            "dyconv",
            "--workers",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    assert "| dyconv | 1 / 1 | 100.0% |" in table
    row = next(line for line in table.splitlines() if line.startswith("| torchvision:mobilenet_v3_small | dyconv"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert int(cells[3]) > 0 and float(cells[5]) < 1e-4 and cells[6] == cells[7] == "yes"


@pytest.mark.skipif(online("download.pytorch.org"), reason="this machine can download weights")
def test_pretrained_offline_fails_with_a_sentence() -> None:
    """The library's sentence names no CLI flag; the CLI adds ``--weights FILE`` from the error's hint."""
    with pytest.raises(RuntimeError, match=r"download pretrained weights for 'resnet18'.*load them from it") as e:
        convert.build_model("resnet18", pretrained=True)
    assert isinstance(e.value, convert.UserError) and e.value.cli_hint == "--weights FILE"
    assert "--" not in str(e.value)
