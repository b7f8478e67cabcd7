"""convert: the model-surgery side of dynconv.

Walks a model, turns the chosen ``nn.Conv2d`` layers into dynamic convolutions built
from their weights (same function right after conversion), and saves/loads
checkpoints that rebuild without pickle.
"""

from .checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from .collapse import CollapseResult, LayerPlan, collapse
from .converter import ConversionResult, ConversionWarning, LayerRecord, SkipRecord, convert_model
from .errors import DynconvError, UserError, WorkFailedError
from .export import ExportError, ExportResult, export_onnx
from .folding import FoldError, FoldResult, find_conv_bn_pairs, fold_batchnorm
from .heads import HeadError, replace_head
from .models import ModelNotFoundError, ModelSource, build_model, list_models
from .probe import ProbeError
from .recipe import Recipe, RecipeError, load_recipe
from .selection import SelectionError
from .sharing import SharingPlan
from .weights import WeightsError, load_weights, read_state_dict

__all__ = [
    "CheckpointError",
    "CollapseResult",
    "ConversionResult",
    "ConversionWarning",
    "DynconvError",
    "ExportError",
    "ExportResult",
    "FoldError",
    "FoldResult",
    "HeadError",
    "LayerPlan",
    "LayerRecord",
    "ModelNotFoundError",
    "ModelSource",
    "ProbeError",
    "Recipe",
    "RecipeError",
    "SelectionError",
    "SharingPlan",
    "SkipRecord",
    "UserError",
    "WeightsError",
    "WorkFailedError",
    "build_model",
    "collapse",
    "convert_model",
    "export_onnx",
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "list_models",
    "load_checkpoint",
    "load_recipe",
    "load_weights",
    "read_metadata",
    "read_state_dict",
    "replace_head",
    "save_checkpoint",
]
