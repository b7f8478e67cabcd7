"""Checkpoints: metadata, atomic writes, and every way a file can be refused; weights files; model names."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_convert_api import TiedNet, TinyNet, tiny, x_for
from torch import nn

import convert
import convert.checkpoint as checkpoint_module


@pytest.fixture(scope="module")
def resnet_result():
    torch.manual_seed(0)
    return convert.convert_model(convert.build_model("resnet18"), kind="dyconv", experts=2, input_size=32)


@pytest.fixture
def saved(resnet_result, tmp_path) -> Path:
    return convert.save_checkpoint(resnet_result, tmp_path / "resnet18.safetensors")


def test_metadata_records_everything_the_contract_lists(saved, resnet_result) -> None:
    meta = convert.read_metadata(saved)
    assert meta["format_version"] == checkpoint_module.FORMAT_VERSION
    assert meta["base"] == {"source": "torchvision", "name": "resnet18", "kwargs": {}}
    assert meta["recipe"]["overrides"] == {"kind": "dyconv", "experts": 2}
    assert len(meta["layers"]) == len(resnet_result.layers)
    first = meta["layers"][0]
    assert first["kind"] == "dyconv" and first["options"]["experts"] == 2 and "temperature" in first["options"]
    assert set(meta["versions"]) == {"dynconv", "torch", "torchvision", "timm"}
    assert meta["digest"]["algorithm"] == "sha256" and len(meta["digest"]["value"]) == 64


def test_round_trip_with_builder_kwargs(tmp_path) -> None:
    torch.manual_seed(0)
    model = convert.build_model("resnet18", num_classes=7)
    result = convert.convert_model(model, kind="condconv", input_size=32)
    loaded = convert.load_checkpoint(convert.save_checkpoint(result, tmp_path / "r.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    assert loaded(x).shape == (1, 7)
    torch.testing.assert_close(loaded(x), result.model.eval()(x), rtol=0, atol=0)


def test_modules_that_check_their_state_dict_version_load(tmp_path) -> None:
    """torchvision's MNASNet refuses a state dict without version metadata (safetensors has none)."""
    torch.manual_seed(0)
    result = convert.convert_model(convert.build_model("mnasnet0_5"), kind="dynet", input_size=32)
    loaded = convert.load_checkpoint(convert.save_checkpoint(result, tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), result.model.eval()(x), rtol=0, atol=0)


def test_a_model_trained_after_conversion_saves_and_loads(resnet_result, tmp_path) -> None:
    model = resnet_result.model
    with torch.no_grad():
        model.layer1[0].conv1.router.fc2.weight.normal_()  # as if trained
    path = convert.save_checkpoint(model, tmp_path / "trained.safetensors")
    loaded = convert.load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    # ... and once loaded, it can be saved again.
    again = convert.load_checkpoint(convert.save_checkpoint(loaded, tmp_path / "again.safetensors"))
    torch.testing.assert_close(again(x), loaded(x), rtol=0, atol=0)


def test_unconverted_model_is_refused(tmp_path) -> None:
    with pytest.raises(convert.CheckpointError, match=r"not produced by convert.convert_model"):
        convert.save_checkpoint(tiny(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_existing_output_is_kept_unless_overwrite(saved, resnet_result) -> None:
    before = saved.read_bytes()
    with pytest.raises(convert.CheckpointError, match="already exists"):
        convert.save_checkpoint(resnet_result, saved)
    assert saved.read_bytes() == before
    convert.save_checkpoint(resnet_result, saved, overwrite=True)
    convert.load_checkpoint(saved)


def test_interrupted_write_leaves_the_old_file_and_no_debris(saved, resnet_result, monkeypatch) -> None:
    before = saved.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        convert.save_checkpoint(resnet_result, saved, overwrite=True)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_the_written_file_has_the_umask_mode_not_mkstemps(saved) -> None:
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o666 & ~umask


def test_missing_folder_is_refused(resnet_result, tmp_path) -> None:
    with pytest.raises(convert.CheckpointError, match="does not exist"):
        convert.save_checkpoint(resnet_result, tmp_path / "nope" / "x.safetensors")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_tensor_is_refused(saved) -> None:
    _flip_last_byte(saved)
    with pytest.raises(convert.CheckpointError, match="modified or corrupted: its digest does not match"):
        convert.load_checkpoint(saved)


def test_tampered_metadata_is_refused(saved) -> None:
    with open(saved, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        body = f.read()
    meta = json.loads(header["__metadata__"]["dynconv"])
    meta["layers"][0]["options"]["experts"] = 3  # a structural lie the digest must catch
    header["__metadata__"]["dynconv"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    saved.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    with pytest.raises(convert.CheckpointError, match="digest does not match"):
        convert.load_checkpoint(saved)


def test_truncated_file_is_refused(saved) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.CheckpointError, match="truncated"):
        convert.load_checkpoint(saved)


@pytest.mark.parametrize("content", [b"", b"hello", b"not a safetensors file at all, just text" * 10])
def test_not_safetensors_is_refused(tmp_path, content) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(convert.CheckpointError, match="not a safetensors file"):
        convert.load_checkpoint(path)


def test_plain_safetensors_without_dynconv_metadata_is_refused(tmp_path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(convert.CheckpointError, match="not a dynconv checkpoint"):
        convert.load_checkpoint(path)


def test_newer_format_is_refused(tmp_path) -> None:
    path = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"dynconv": json.dumps({"format_version": 99})})
    with pytest.raises(convert.CheckpointError, match=r"newer dynconv.*format 99"):
        convert.load_checkpoint(path)


def test_missing_file_and_folder(tmp_path) -> None:
    with pytest.raises(convert.CheckpointError, match="does not exist"):
        convert.load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(convert.CheckpointError, match="is a folder"):
        convert.load_checkpoint(tmp_path)


def test_structure_mismatch_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    result = convert.convert_model(TiedNet(), input_size=12)
    path = convert.save_checkpoint(result, tmp_path / "tied.safetensors")
    with pytest.raises(convert.CheckpointError, match=r"custom model.*pass model="):
        convert.load_checkpoint(path)
    with pytest.raises(convert.CheckpointError, match="does not match the base model"):
        convert.load_checkpoint(path, model=TinyNet())

    class Wider(TiedNet):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 4)

    with pytest.raises(convert.CheckpointError, match="does not match the base model's structure"):
        convert.load_checkpoint(path, model=Wider())


def test_loading_never_unpickles(saved, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    convert.load_checkpoint(saved)


def test_custom_base_model_input_is_not_modified(tmp_path) -> None:
    base = tiny()
    result = convert.convert_model(base, input_size=16)
    path = convert.save_checkpoint(result, tmp_path / "tiny.safetensors")
    fresh = TinyNet()
    loaded = convert.load_checkpoint(path, model=fresh)
    assert not any(isinstance(m, type(result.model.body[0])) for m in fresh.modules())
    torch.testing.assert_close(loaded(x_for()), result.model(x_for()), rtol=0, atol=0)


# --- original weights files -------------------------------------------------------------


def test_read_weights_from_pth_and_safetensors(tmp_path) -> None:
    model = tiny(1)
    state = model.state_dict()
    torch.save(state, tmp_path / "w.pth")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "ddp.pt", "w.safetensors"):
        target = convert.load_weights(tiny(2), tmp_path / name)
        assert all(torch.equal(target.state_dict()[k], state[k]) for k in state), name


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_files_that_are_refused(tmp_path) -> None:
    with pytest.raises(convert.WeightsError, match="does not exist"):
        convert.read_state_dict(tmp_path / "absent.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"w": _Evil()}, evil)
    with pytest.raises(convert.WeightsError, match=r"weights_only=True"):
        convert.read_state_dict(evil)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 junk")
    with pytest.raises(convert.WeightsError, match="cannot read weights file"):
        convert.read_state_dict(junk)
    torch.save(tiny().state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(convert.WeightsError, match=r"do not fit the model: .*missing.*unexpected"):
        convert.load_weights(TiedNet(), tmp_path / "tiny.pth")


# --- model names ------------------------------------------------------------------------


def test_build_model_sources_and_errors() -> None:
    expected = convert.ModelSource(source="torchvision", name="resnet18", kwargs={})
    assert convert.build_model("resnet18").dynconv_base == expected
    assert convert.build_model("convnext_atto").dynconv_base.source == "timm"
    custom = convert.build_model("test_convert_api:TinyNet")
    assert isinstance(custom, TinyNet) and custom.dynconv_base.source == "custom"
    with pytest.raises(convert.ModelNotFoundError, match="Did you mean: resnet18"):
        convert.build_model("resnet1")
    with pytest.raises(convert.ModelNotFoundError, match="cannot import module"):
        convert.build_model("no_such_module:factory")
    assert ("torchvision", "resnet18") in convert.list_models("resnet1*")
    assert ("timm", "resnet18d") in convert.list_models("resnet18*")
