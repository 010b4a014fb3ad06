"""One file per op: public function, input checks, fake kernels, autograd and the backends'
load step."""
from mmkernels.ops import cross_modal_attention as _cross_modal_attention
from mmkernels.ops import gated_fusion as _gated_fusion
from mmkernels.ops.cross_modal_attention import cross_modal_attention
from mmkernels.ops.gated_fusion import gated_fusion

__all__ = ["cross_modal_attention", "gated_fusion", "load_backend"]


def load_backend(name: str) -> None:
    """Import `name`'s kernels for every op and register their fake kernels and autograd (once).
    The entry points do this themselves; call it before using `torch.ops.mmkernels.*` directly."""
    for op in (_cross_modal_attention, _gated_fusion):
        op.load(name)
