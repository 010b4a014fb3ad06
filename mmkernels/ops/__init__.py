"""One file per op: public function, input checks, fake kernels and autograd."""
from mmkernels.ops.cross_modal_attention import cross_modal_attention
from mmkernels.ops.gated_fusion import gated_fusion

__all__ = ["cross_modal_attention", "gated_fusion"]
