"""dynconv: dynamic convolutions (CondConv, DyConv, DyNet, DCD, ODConv) on one shared core.

Runtime package: imports torch only, so a converted model needs nothing else to run.
"""

from . import core, functional
from .calibration import CalibrationReport, calibrate_routing
from .experts import upcycle
from .folding import fold_batchnorm_
from .functional import EXPORTABLE_STRATEGIES, STRATEGIES, dynamic_conv2d, strategy_scope
from .inspection import capture_routing, dynamic_layers
from .layers import (
    LAYERS,
    Bounds,
    CondConv2d,
    DCDConv2d,
    DyConv2d,
    DynamicConv2d,
    DyNetConv2d,
    KindInfo,
    ODConv2d,
    OptionSpec,
    layer_class,
    register,
)
from .layers.base import TF_SAME
from .routing import Router
from .shared_routing import RoutingShare, share_routing
from .standardization import WeightStandardization
from .temperature import TemperatureSchedule, set_temperature
from .training import expert_parameters, other_parameters, parameter_groups, router_parameters, set_trainable

__version__ = "0.1.0"

__all__ = [
    "EXPORTABLE_STRATEGIES",
    "LAYERS",
    "STRATEGIES",
    "TF_SAME",
    "Bounds",
    "CalibrationReport",
    "CondConv2d",
    "DCDConv2d",
    "DyConv2d",
    "DyNetConv2d",
    "DynamicConv2d",
    "KindInfo",
    "ODConv2d",
    "OptionSpec",
    "Router",
    "RoutingShare",
    "TemperatureSchedule",
    "WeightStandardization",
    "__version__",
    "calibrate_routing",
    "capture_routing",
    "core",
    "dynamic_conv2d",
    "dynamic_layers",
    "expert_parameters",
    "fold_batchnorm_",
    "functional",
    "layer_class",
    "other_parameters",
    "parameter_groups",
    "register",
    "router_parameters",
    "set_temperature",
    "set_trainable",
    "share_routing",
    "strategy_scope",
    "upcycle",
]
