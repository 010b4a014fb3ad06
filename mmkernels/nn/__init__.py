"""Modules built on the mmkernels ops."""
from mmkernels.nn.attention import CrossModalAttention, CrossModalBlock, SelfAttentionBlock
from mmkernels.nn.fusion import GatedMultimodalUnit, LogMelFrontEnd
from mmkernels.nn.multihead_attention import MultiheadAttention, replace_multihead_attention

__all__ = ["CrossModalAttention", "CrossModalBlock", "SelfAttentionBlock", "GatedMultimodalUnit", "LogMelFrontEnd",
           "MultiheadAttention", "replace_multihead_attention"]
