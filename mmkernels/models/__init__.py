"""Encoders, the fusion model and its heads."""
from mmkernels.models.fusion_model import FusionModel, ModelConfig

__all__ = ["FusionModel", "ModelConfig"]
