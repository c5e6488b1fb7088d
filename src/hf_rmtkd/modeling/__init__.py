"""RMT-KD checkpoint code: the config, the model classes and the reduced layers (copied into every checkpoint)."""

from .configuration_rmtkd import FORMAT_VERSION, RMTKDConfig
from .layers_rmtkd import (
    LowRankConv2d,
    LowRankEmbedding,
    LowRankLinear,
    ModulePathError,
    ReducedLayerNorm,
    apply_reduction_map,
    build_reduction,
    get_submodule,
    plan_reduction,
    set_submodule,
)
from .modeling_rmtkd import (
    RMTKD_CLASSES,
    RMTKDForCausalLM,
    RMTKDForImageClassification,
    RMTKDForMaskedLM,
    RMTKDForSequenceClassification,
    RMTKDForTokenClassification,
    RMTKDModel,
    RMTKDPreTrainedModel,
    auto_map_for,
    register_auto_classes,
    rmtkd_class_for,
)

__all__ = [
    "FORMAT_VERSION",
    "RMTKDConfig",
    "LowRankConv2d",
    "LowRankEmbedding",
    "LowRankLinear",
    "ReducedLayerNorm",
    "ModulePathError",
    "apply_reduction_map",
    "build_reduction",
    "get_submodule",
    "plan_reduction",
    "set_submodule",
    "RMTKD_CLASSES",
    "RMTKDForCausalLM",
    "RMTKDForImageClassification",
    "RMTKDForMaskedLM",
    "RMTKDForSequenceClassification",
    "RMTKDForTokenClassification",
    "RMTKDModel",
    "RMTKDPreTrainedModel",
    "auto_map_for",
    "register_auto_classes",
    "rmtkd_class_for",
]
