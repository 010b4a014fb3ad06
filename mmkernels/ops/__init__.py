"""One file per op: public function, input checks, fake kernels, autograd and the backends'
load step."""
from mmkernels.ops.cross_modal_attention import cross_modal_attention
from mmkernels.ops.gated_fusion import gated_fusion

__all__ = ["cross_modal_attention", "gated_fusion", "load_backend"]


def load_backend(name: str) -> None:
    """Import `name`'s kernels for every op and register their fake kernels and autograd (once).
    The entry points do this themselves; call it before using `torch.ops.mmkernels.*` directly."""
    if name == "triton":
        from mmkernels.ops import _load_triton  # noqa: F401
