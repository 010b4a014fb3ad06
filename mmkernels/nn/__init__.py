"""Modules built on the mmkernels ops."""
from mmkernels.nn.attention import CrossModalAttention, CrossModalBlock, SelfAttentionBlock
from mmkernels.nn.fusion import GatedMultimodalUnit, LogMelFrontEnd

__all__ = ["CrossModalAttention", "CrossModalBlock", "SelfAttentionBlock", "GatedMultimodalUnit", "LogMelFrontEnd"]
