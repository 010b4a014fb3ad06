"""mmkernels: fused kernels for multimodal fusion (cross-modal attention, gated fusion)."""
from mmkernels.ops import cross_modal_attention, gated_fusion
from mmkernels.reference import cross_modal_attention_reference, gated_fusion_reference

__version__ = "0.1.0"
__all__ = [
    "cross_modal_attention",
    "gated_fusion",
    "cross_modal_attention_reference",
    "gated_fusion_reference",
]
