"""Triton kernels of the mmkernels ops (imported lazily: importing mmkernels never imports triton).

Importing this package defines the ops `mmkernels::triton_cma_fwd/bwd` and
`mmkernels::triton_gated_fusion_fwd/bwd` (torch.library.triton_op) and
registers their fake kernels and autograd through the shared functions of
mmkernels/ops/*.py. On CPU tensors the kernels run only under
TRITON_INTERPRET=1, which must be set before triton is first imported.
"""
from __future__ import annotations

from typing import List

import torch

from mmkernels.triton import attention, gated_fusion  # noqa: F401  (define the ops)
from mmkernels.triton.attention import split_kv_settings  # noqa: F401


def _register() -> None:
    import importlib

    # mmkernels.ops re-exports the functions under the modules' names: import the modules.
    _cma = importlib.import_module("mmkernels.ops.cross_modal_attention")
    _gf = importlib.import_module("mmkernels.ops.gated_fusion")

    _cma.register("triton_cma_fwd", "triton_cma_bwd")
    _gf.register("triton_gated_fusion_fwd", "triton_gated_fusion_bwd")


_register()


def not_supported_reasons(call) -> List[str]:
    """Limits of the Triton kernels beyond the common GPU ones checked in backends.py."""
    reasons: List[str] = []
    if call.device_type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major < 8:
            reasons.append(
                f"the Triton kernels need compute capability 8.0 or newer (tl.dot in bf16/fp16 "
                f"with fp32 accumulation), got {major}.x"
            )
    if call.op == "cross_modal_attention" and call.num_segments > attention.MAX_SEGMENTS:
        reasons.append(f"at most {attention.MAX_SEGMENTS} KV segments, got {call.num_segments}")
    return reasons
