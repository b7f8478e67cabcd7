"""Fine-tuning converted checkpoints on timm's training stack: one package, one job per module.

- :mod:`.config`: :class:`TrainConfig`, every default and its help text (the CLI derives from it);
- :mod:`.data`: image folders with the checkpoint's preprocessing, seeded resumable batch order;
- :mod:`.optimisation`: timm's optimizer, schedule, loss and mixup over ``dynconv.parameter_groups``;
- :mod:`.state`: the resumable state in the ``OUTPUT.train.safetensors`` sidecar;
- :mod:`.loop`: the training loop (AMP, EMA, clipping, DDP, save points);
- :mod:`.run`: :func:`finetune`, checkpoint in, fine-tuned checkpoint out.
"""

from .config import TrainConfig
from .data import image_folder_splits
from .loop import EpochLog, Hooks, RunState, evaluate, train_model
from .run import Reporter, dynconv_input_size, finetune, new_head
from .state import TrainingState, read_sidecar_info, sidecar_path

__all__ = [
    "EpochLog",
    "Hooks",
    "Reporter",
    "RunState",
    "TrainConfig",
    "TrainingState",
    "dynconv_input_size",
    "evaluate",
    "finetune",
    "image_folder_splits",
    "new_head",
    "read_sidecar_info",
    "sidecar_path",
    "train_model",
]
