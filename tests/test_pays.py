"""The "does it pay?" benchmark runs end to end on a tiny Fashion-MNIST subsample; missing data fails clearly."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import pays

DATA = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--size", "32", "--train-size", "128", "--val-size", "64", "--test-size", "64", "--base-epochs", "1"]


def run_pays(*args: str, tmp: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pays.main([*args, "--cache", str(tmp / "cache"), "--results", str(tmp)])


def test_missing_data_is_one_sentence_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_pays("sweep", "--data", str(tmp_path / "nowhere"), *TINY, tmp=tmp_path) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: Fashion-MNIST's idx files are not in") and message.count("\n") == 0
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message
    assert not (tmp_path / "pays-sweep.json").exists()


@pytest.mark.skipif(not DATA.is_dir(), reason="needs `apt-get install dataset-fashion-mnist`")
def test_sweep_final_report_on_a_tiny_subsample(tmp_path: Path) -> None:
    kinds = ["--kinds", "static", "condconv"]
    assert run_pays("sweep", *TINY, *kinds, "--grid", "opt=sgd,adamw", "--epochs", "1", tmp=tmp_path) == 0
    tried = json.loads((tmp_path / "pays-sweep.json").read_text())
    assert sorted((r["kind"], r["label"]) for r in tried) == [
        ("condconv", "defaults"),
        ("condconv", "opt=sgd"),
        ("static", "defaults"),
        ("static", "opt=sgd"),
    ]
    assert all(r["setup"]["train"] == 128 and 0 <= r["val_acc"] <= 1 for r in tried)
    assert max(r["max_diff"] for r in tried if r["kind"] == "condconv") < 1e-4  # the conversion is exact

    final = ["--seeds", "0", "--epochs", "1", "--analyze-per-class", "2"]
    assert run_pays("final", *TINY, *kinds, *final, tmp=tmp_path) == 0
    runs = {r["kind"]: r for r in json.loads((tmp_path / "pays-final-seeds0-static-condconv.json").read_text())}
    assert set(runs) == {"base", "static", "condconv", "static-wall"}
    assert runs["static-wall"]["wall_kind"] == "condconv" and runs["static-wall"]["steps"] >= runs["static"]["steps"]
    routing = runs["condconv"]["routing"]
    assert routing["before"]["images"] == 20 and routing["before"]["layers"] == routing["after"]["layers"] > 0
    assert routing["before"]["entropy"] > 0.99  # a fresh conversion routes uniformly

    assert run_pays("report", tmp=tmp_path) == 0
    text = (tmp_path / "pays.md").read_text()
    assert "| condconv | " in text and "## Settings tried (validation split, seed 0)" in text
    assert "(the default kind) vs static continued" in text
    measured = (tmp_path / "measured.py").read_text()  # what `dynconv kinds` would show: condconv only here
    assert '"condconv": (' in measured and "vs static continued" in measured and '"dcd"' not in measured


def test_dynconv_kinds_shows_what_the_benchmark_measured() -> None:
    """convert/measured.py is what `pays.py report` writes from the committed final records, and kinds shows it."""
    from pays_report import RESULTS_DIR, extra_finals, final_records, measured_module

    from convert.cli.render import kinds_text
    from convert.measured import PAYS
    from dynconv import LAYERS

    records, base = final_records(RESULTS_DIR)
    assert records and base is not None
    module = Path(__file__).resolve().parent.parent / "convert" / "measured.py"
    assert module.read_text() == measured_module(records, base["setup"], extra_finals(RESULTS_DIR))
    assert "20000 training images" in PAYS["condconv"] and "calibrate=4" in PAYS["condconv"]  # today's default
    blocks = {block.split()[0]: " ".join(block.split()) for block in kinds_text(LAYERS, width=100).split("\n\n")}
    for kind in ("condconv", "dyconv", "dynet", "dcd", "odconv"):
        assert "measured: Fashion-MNIST, mobilenet_v3_small" in blocks[kind]
        assert " ".join(PAYS[kind].split()) in blocks[kind]
