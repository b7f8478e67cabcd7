"""Converted checkpoints: one ``.safetensors`` file that rebuilds the model without pickle.

The file's metadata key ``dynconv`` holds JSON: format version, base model
(source, name, constructor arguments), the resolved recipe, every converted layer
with its options, the blocks whose layers share one router (format 2), tensor
aliases (tied weights), the layers ``convert.collapse`` made static again (stored as
the base model's convs, so no format change), library versions, and a SHA-256
digest over the tensors and that recorded structure. Writes go to a temporary file
in the target folder and are renamed into place, so an interrupted write leaves the
old file (or none) at the path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import dynconv

from .atomic import staged_output
from .converter import CONVERSION_ATTR, Conversion, ConversionResult
from .errors import OutputPathError, UserError, check_output_path
from .folding import FOLDED_ATTR
from .heads import replace_head
from .models import ModelSource, tag_base
from .plan import ConvPlan
from .preprocessing import Preprocessing, resolve_preprocessing
from .sharing import apply_groups
from .surgery import build_layer, get_module, replace_all
from .weights import with_module_versions

#: 2 adds ``sharing`` (routers shared per block) and ``head`` (a new classifier head);
#: format 1 files still load (no sharing, the original head). 3: ODConv's and DCD's router heads
#: are one linear layer (``router.head``, one GEMM); their separate format-2 heads are stacked on
#: load (:func:`dynconv.routing.stack_legacy_heads`), so older files still load.
FORMAT_VERSION = 3
METADATA_KEY = "dynconv"
#: Tensors under this prefix hold optional training state (optimizer buffers), not the model.
TRAINING_PREFIX = "__training__."


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read back; the message says which and why."""


def _versions() -> dict[str, str]:
    versions = {"dynconv": dynconv.__version__, "torch": torch.__version__}
    for module in ("torchvision", "timm"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "not installed"
    return versions


def _own_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (each owning its storage) and ``alias -> stored name`` for tied ones."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach() if _own_storage(t) else t.detach().contiguous().clone()
    return tensors, aliases


def _digest(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> str:
    sha = hashlib.sha256(json.dumps(structure, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        sha.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        sha.update(t.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return sha.hexdigest()


def _conversion_of(source: ConversionResult | nn.Module) -> tuple[nn.Module, Conversion]:
    model = source.model if isinstance(source, ConversionResult) else source
    conversion = getattr(model, CONVERSION_ATTR, None)
    if not isinstance(conversion, Conversion):
        raise CheckpointError(
            "this model was not produced by convert.convert_model or convert.load_checkpoint, so nothing "
            "records its structure; convert it first"
        )
    if getattr(model, FOLDED_ATTR, None):
        raise CheckpointError(
            "this model has BatchNorm folded into its convs, a deployment form a checkpoint cannot rebuild; "
            "save the model before folding and fold at export (export_onnx(fold_bn=True))",
            cli_hint="dynconv export --fold-bn",
        )
    return model, conversion


def save_checkpoint(
    source: ConversionResult | nn.Module,
    path: str | Path,
    *,
    overwrite: bool = False,
    training: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a converted model (a result, or a model converted earlier and trained since).

    Refuses to replace an existing file unless ``overwrite``; the write is atomic.
    ``training`` is optional ``(info, tensors)`` state for resuming a fine-tuning run.
    """
    path = Path(path)
    model, conversion = _conversion_of(source)
    try:
        check_output_path(path, overwrite)
    except OutputPathError as exc:
        raise CheckpointError(str(exc)) from None
    tensors, aliases = _dedupe(model.state_dict())
    if training is not None:
        tensors.update({TRAINING_PREFIX + k: v.detach().contiguous().clone() for k, v in training[1].items()})
    structure = {
        "format_version": FORMAT_VERSION,
        "base": conversion.base.to_dict(),
        "recipe": conversion.recipe,
        "input_shape": list(conversion.input_shape),
        "layers": conversion.layers,
        "aliases": aliases,
        "versions": _versions(),
    }
    if conversion.sharing:
        structure["sharing"] = conversion.sharing
    if conversion.head is not None:
        structure["head"] = conversion.head
    structure["preprocessing"] = resolve_preprocessing(model).to_dict()
    if conversion.collapsed:
        structure["collapsed"] = conversion.collapsed
    if training is not None:
        structure["training"] = training[0]
    try:
        structure = json.loads(json.dumps(structure))  # the exact form a reader will see
    except TypeError as exc:
        raise CheckpointError(f"the base model's constructor arguments are not JSON-serialisable: {exc}") from None
    meta = {**structure, "digest": {"algorithm": "sha256", "value": _digest(tensors, structure)}}
    return write_safetensors_atomic(tensors, path, {METADATA_KEY: json.dumps(meta)})


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file through a synced staged file renamed into place: never half-written."""
    try:
        with staged_output(path) as staged:
            save_file(tensors, staged, metadata=metadata)
    except OSError as exc:
        raise CheckpointError(f"cannot write to folder {path.parent}: {exc.strerror or exc}") from None
    return path


def read_training_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The ``(info, tensors)`` training state saved with a checkpoint, or ``None``."""
    meta = read_metadata(path)
    if "training" not in meta:
        return None
    tensors = _read_tensors(Path(path))
    n = len(TRAINING_PREFIX)
    return meta["training"], {k[n:]: v for k, v in tensors.items() if k.startswith(TRAINING_PREFIX)}


def checkpoint_preprocessing(path: str | Path, model: nn.Module | None = None) -> Preprocessing:
    """The preprocessing a checkpoint records; older files: resolved from ``model`` (the loaded checkpoint)."""
    recorded = read_metadata(path).get("preprocessing")
    if recorded:
        return Preprocessing.from_dict(recorded)
    return resolve_preprocessing(model) if model is not None else Preprocessing()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``dynconv`` metadata of a checkpoint, after checking the file is whole safetensors."""
    path = Path(path)
    header = _read_header(path)
    meta = header.get("__metadata__") or {}
    if METADATA_KEY not in meta:
        raise CheckpointError(
            f"{path} is a safetensors file but not a dynconv checkpoint (no '{METADATA_KEY}' metadata); "
            "load plain weights with convert.load_weights",
            cli_hint="--weights FILE",
        )
    try:
        data = json.loads(meta[METADATA_KEY])
        version = int(data["format_version"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: the dynconv metadata is corrupt (not the JSON this format expects)") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer dynconv (format {version}, this one reads up to {FORMAT_VERSION}); "
            "upgrade dynconv to read it"
        )
    return data


def tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """``name -> shape`` of every tensor in a safetensors file, read from its header only."""
    header = _read_header(Path(path))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _read_header(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise CheckpointError(
                    f"{path} is not a safetensors file, or it is truncated (header runs past the end)"
                )
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + length + max(ends, default=0) > size:
        raise CheckpointError(f"{path} is truncated: its header describes more data than the file holds")
    return header


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types
        if "allocate" in str(exc) or "mmap" in str(exc):
            raise MemoryError(f"not enough memory to read {path} ({path.stat().st_size / 2**30:.1f} GiB)") from None
        raise CheckpointError(f"{path} is corrupt: {exc}") from None


def _base_model(meta: dict[str, Any], model: nn.Module | None, path: Path) -> nn.Module:
    base = ModelSource.from_dict(meta["base"])
    if model is not None:
        fresh = copy.deepcopy(model)
        tag_base(fresh, base)
        return fresh
    if base.source == "custom":
        raise CheckpointError(
            f"{path} was converted from a custom model ({base.name}); pass model= with an instance of it",
            cli_hint="--model package.module:factory",
        )
    try:
        return base.build()
    except Exception as exc:
        raise CheckpointError(f"cannot rebuild base model {base.source}:{base.name} ({exc})") from None


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a converted model from ``path``, check its digest, and return it in eval mode.

    The base architecture comes from torchvision/timm by the recorded name, or from
    ``model`` (a base module, not modified) for custom models.
    """
    path = Path(path)
    meta = read_metadata(path)
    tensors = _read_tensors(path)
    structure = {k: v for k, v in meta.items() if k != "digest"}
    expected = (meta.get("digest") or {}).get("value")
    if expected != _digest(tensors, structure):
        raise CheckpointError(f"{path} has been modified or corrupted: its digest does not match its contents")
    rebuilt = _base_model(meta, model, path)
    if meta.get("head"):  # the new classifier head, before the convs (it may hold one)
        replace_head(rebuilt, int(meta["head"]["num_classes"]))
    for record in meta["layers"]:
        names = list(record["names"])
        try:
            conv = get_module(rebuilt, names[0])
        except AttributeError:
            raise CheckpointError(f"{path} does not match the base model: it has no module {names[0]!r}") from None
        if not isinstance(conv, nn.Conv2d):
            raise CheckpointError(
                f"{path} does not match the base model: {names[0]!r} is a {type(conv).__name__}, not a Conv2d"
            )
        replace_all(rebuilt, names, build_layer(conv, ConvPlan.from_record(conv, record["kind"], record["options"])))
    sharing = list(meta.get("sharing") or [])
    try:
        apply_groups(rebuilt, sharing)
    except (UserError, AttributeError) as exc:
        raise CheckpointError(
            f"{path} does not match the base model: its shared routing cannot be rebuilt ({exc})"
        ) from None
    model_tensors = {k: v for k, v in tensors.items() if not k.startswith(TRAINING_PREFIX)}
    state = with_module_versions(model_tensors, rebuilt)
    for alias, stored in (meta.get("aliases") or {}).items():
        state[alias] = tensors[stored]
    try:
        rebuilt.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path} does not match the base model's structure: {first}") from None
    setattr(
        rebuilt,
        CONVERSION_ATTR,
        Conversion(
            ModelSource.from_dict(meta["base"]),
            meta.get("recipe", {}),
            tuple(meta["input_shape"]),
            list(meta["layers"]),
            sharing,
            head=meta.get("head"),
            collapsed=list(meta.get("collapsed") or []),
        ),
    )
    return rebuilt.eval()
