"""Triton kernels of the mmkernels ops (imported lazily: importing mmkernels never imports triton).

The kernel modules import only torch and triton. Importing `attention` and
`gated_fusion` defines the ops `mmkernels::triton_cross_modal_attention_fwd/bwd` and
`mmkernels::triton_gated_fusion_fwd/bwd` (torch.library.triton_op); their fake
kernels and autograd live beside the Python entry points and are registered by
the backend's load step, `mmkernels/ops/_load_triton.py`, which the entry points
import the first time they run this backend (`mmkernels.ops.load_backend("triton")`
does it up front). What the backend can serve is declared in
`mmkernels.backends.TritonBackend`. On CPU tensors the kernels run only under
TRITON_INTERPRET=1, which must be set before triton is first imported.
"""
from __future__ import annotations

from mmkernels.triton import cross_modal_attention, gated_fusion  # noqa: F401  (define the ops)
from mmkernels.triton.cross_modal_attention import split_kv_settings  # noqa: F401
