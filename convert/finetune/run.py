"""``finetune``: a converted checkpoint trained on an image folder, the model written after every epoch.

The output is an ordinary checkpoint (the better of the raw and EMA weights by validation,
with the training record in its metadata); the resumable state goes to the sidecar
``OUTPUT.train.safetensors`` (see :mod:`convert.finetune.state`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, checkpoint_preprocessing, load_checkpoint, read_metadata, save_checkpoint
from ..converter import CONVERSION_ATTR
from ..errors import UserError, check_output_path
from ..heads import replace_head
from .config import TrainConfig
from .data import image_folder_splits
from .loop import EpochLog, Hooks, RunState, train_model, with_calibration_default
from .optimisation import check_config
from .state import TrainingState, read_sidecar, read_sidecar_info, sidecar_path, write_sidecar


@dataclass
class Reporter:
    """What a caller hears: the run's header, each step, each epoch, each save (``path, epoch, step``)."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: Callable[[int, int, float], None] | None = None
    on_epoch: Callable[[EpochLog], None] | None = None
    on_saved: Callable[[Path, int, int], None] | None = None


def finetune(
    checkpoint: Path,
    data: Path,
    output: Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    num_classes: int | None = None,
    model: nn.Module | None = None,
) -> RunState:
    """Fine-tune a converted checkpoint on an image folder; write ``output`` after every epoch.

    With ``resume``, continue the run whose state is in ``output``'s sidecar. ``num_classes``
    gives a model that predicts another number of classes a new head first; ``model`` is the
    base module of a checkpoint converted from custom code (see :func:`~convert.load_checkpoint`).
    """
    config = config or TrainConfig()
    check_config(config)  # impossible settings are said before any file is read
    reporter = reporter or Reporter()
    checkpoint, data, output = Path(checkpoint), Path(data), Path(output)
    sidecar = sidecar_path(output)
    source_digest = read_metadata(checkpoint).get("digest", {}).get("value")
    saved = resumable_state(output, config, source_digest) if resume else None
    if not resume:
        check_output_path(output, overwrite, force="--force" if reporter.on_start else "overwrite=True")
        if sidecar.exists() and not overwrite:
            raise UserError(
                f"{sidecar} holds an unfinished run writing {output}; continue it with --resume, "
                "or start over with --force"
            )
    net = load_checkpoint(checkpoint, model=model)
    if saved is not None and config.calibrate_routing is None:  # left to the kinds: as the run started
        config = replace(config, calibrate_routing=saved.info["config"].get("calibrate_routing", 0))
    config = with_calibration_default(config, net)
    prep = checkpoint_preprocessing(checkpoint, net)
    size = config.image_size or prep.input_size[1]
    train_set, val_set, classes = image_folder_splits(
        data,
        size,
        config.val_fraction,
        config.seed,
        preprocessing=prep,
        auto_augment=config.aa,
        re_prob=config.reprob,
        augment=config.augment,
        crop_min=config.crop_min,
    )
    if num_classes is not None and num_classes != classes:
        raise UserError(f"a head for {num_classes} classes was asked for, but {data} has {classes} classes")
    outputs = _output_classes(net, size)
    if outputs != classes:
        if num_classes is None:
            raise UserError(
                f"the model predicts {outputs} classes but {data} has {classes}; give it a new head for them",
                cli_hint=f"--num-classes {classes}",
            )
        new_head(net, classes, config.seed)
    run_id = saved.info["run"] if saved is not None else _run_id(source_digest, config)
    record = {
        "run": run_id,
        "config": config.recorded(),
        "source": str(checkpoint),
        "source_digest": source_digest,
        "data": str(data),
        "sidecar": sidecar.name,
    }

    def on_save(state: TrainingState) -> None:
        write_sidecar(sidecar, TrainingState({**state.info, **record}, state.tensors))
        if reporter.on_saved is not None:
            reporter.on_saved(sidecar, state.info["epoch"], state.info["step"])

    def on_epoch(log: EpochLog, chosen: nn.Module, state: TrainingState) -> None:
        training = {**record, "epoch": log.epoch, "epochs": config.epochs, "weights": log.weights}
        training["history"] = state.info["history"]
        save_checkpoint(chosen, output, overwrite=True, training=(training, {}))  # the model first, then its state
        on_save(state)
        if reporter.on_epoch is not None:
            reporter.on_epoch(log)

    if not resume:
        sidecar.unlink(missing_ok=True)  # overwriting (--force): the old run's state must not outlive it
    describe = {"classes": classes, "image_size": size, "preprocessing": prep.to_dict()}
    hooks = Hooks(reporter.on_start, reporter.on_step, on_epoch, on_save)
    return train_model(net, train_set, val_set, config, classes=classes, resume=saved, hooks=hooks, describe=describe)


def resumable_state(output: Path, config: TrainConfig, source_digest: str | None) -> TrainingState:
    """The sidecar state of ``output``'s run, checked to belong to it, to its source and to ``config``."""
    sidecar = sidecar_path(output)
    info = read_sidecar_info(sidecar)
    if info is None:
        if output.exists() and "training" in read_metadata(output):
            if "__training__" in json.dumps(list(_tensor_names(output))):
                raise UserError(
                    f"{output} was written by an older dynconv that kept the training state inside it; "
                    "it loads as a model, but resuming it is not supported: start a new run with --force"
                )
            raise UserError(f"the training state of {output} ({sidecar.name} beside it) is missing; cannot resume")
        raise UserError(
            f"no save point of a run writing {output} exists yet (no epoch finished, nothing under "
            f"{output} or {sidecar.name}); run the same command without --resume to start it"
        )
    if output.exists():
        recorded = read_metadata(output).get("training") or {}
        if recorded.get("run") != info.get("run"):
            raise UserError(f"{sidecar} belongs to another run than {output}; it cannot resume it")
    if info.get("source_digest") != source_digest:
        raise UserError(f"{output}'s run started from another checkpoint (its digest differs); resume with that one")
    # settings added after a run started (calibrate_routing, augment, crop_min) count as their defaults
    before = {**json.loads(json.dumps(TrainConfig().recorded())), **info["config"]}
    mine = json.loads(json.dumps(config.recorded()))
    if mine["calibrate_routing"] is None:  # left to the kinds: the run decided it when it started
        mine["calibrate_routing"] = before["calibrate_routing"]
    if before != mine:
        changed = ", ".join(f"{k}={before.get(k)!r}" for k, v in mine.items() if before.get(k) != v)
        raise UserError(f"{output} was trained with other settings ({changed}); resume with the same ones")
    return read_sidecar(sidecar)


def _tensor_names(path: Path) -> list[str]:
    from ..checkpoint import tensor_shapes

    return list(tensor_shapes(path))


def _run_id(source_digest: str | None, config: TrainConfig) -> str:
    """An id naming this run: the source, the settings and the start time."""
    text = json.dumps([source_digest, config.recorded(), time.time_ns()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def new_head(model: nn.Module, num_classes: int, seed: int = 0) -> list[str]:
    """Give a converted model (in place) a new classifier head, recorded so its checkpoint rebuilds it."""
    conversion = getattr(model, CONVERSION_ATTR)
    names = replace_head(model, num_classes, seed)
    conversion.head = {"num_classes": num_classes, "layers": names}
    conversion.layers = [r for r in conversion.layers if not set(r["names"]) & set(names)]
    return names


def dynconv_input_size(model: nn.Module) -> int:
    """The square input size a converted model was converted at (224 without a record)."""
    conversion = getattr(model, CONVERSION_ATTR, None)
    return conversion.input_shape[1] if conversion is not None else 224


def _output_classes(model: nn.Module, size: int) -> int:
    model.eval()
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, size, size)).shape[1])


__all__ = ["CheckpointError", "Reporter", "dynconv_input_size", "finetune", "new_head", "resumable_state"]
