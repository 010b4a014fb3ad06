"""Encoders, the fusion model and its heads (FusionModel, ModelConfig; imported when first used, so that
mmkernels.models.config and .export load without the model's code)."""

__all__ = ["FusionModel", "ModelConfig"]


def __getattr__(name):
    if name == "FusionModel":
        from mmkernels.models.fusion_model import FusionModel
        return FusionModel
    if name == "ModelConfig":
        from mmkernels.models.config import ModelConfig
        return ModelConfig
    raise AttributeError(f"module 'mmkernels.models' has no attribute {name!r}")
