"""Triton kernels of the mmkernels ops (imported lazily: importing mmkernels never imports triton).

Importing this package defines the ops `mmkernels::triton_cma_fwd/bwd` and
`mmkernels::triton_gated_fusion_fwd/bwd` (torch.library.triton_op) and
registers their fake kernels and autograd through the shared functions of
mmkernels/ops/*.py. On CPU tensors the kernels run only under
TRITON_INTERPRET=1, which must be set before triton is first imported.
"""
from __future__ import annotations

import functools
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


_CAPABILITY: dict = {}


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


@functools.lru_cache(maxsize=None)  # dispatch asks on every call: the versions don't change
def _interpreter_broken() -> str | None:
    """Triton's interpreter before 3.7 turns 1-element arrays into loop bounds with int(),
    which NumPy 2.4 refuses: every kernel with a data-dependent loop fails there."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter fails with NumPy {numpy.__version__} "
                "(needs triton >= 3.7 or numpy < 2.4)")
    return None


def _capability():
    # cached: dispatch runs on every call, also inside torch.compile'd code
    if "cc" not in _CAPABILITY:
        _CAPABILITY["cc"] = torch.cuda.get_device_capability()
    return _CAPABILITY["cc"]


def not_supported_reasons(call) -> List[str]:
    """Limits of the Triton kernels beyond the common GPU ones checked in backends.py
    (device, dtype fp32/fp16/bf16, head dims <= 256)."""
    reasons: List[str] = []
    if call.device_type == "cpu":
        broken = _interpreter_broken()
        if broken:
            reasons.append(broken)
    if call.device_type == "cuda" and torch.cuda.is_available():
        cc = tuple(_capability())
        if cc < (7, 5):
            reasons.append(f"the Triton kernels need compute capability 7.5 or newer, got {cc[0]}.{cc[1]}")
        elif cc < (8, 0) and call.dtype == torch.bfloat16:
            reasons.append(f"bf16 Triton kernels need compute capability 8.0 or newer, got {cc[0]}.{cc[1]}")
    if call.op == "cross_modal_attention" and call.num_segments > attention.MAX_SEGMENTS:
        reasons.append(f"at most {attention.MAX_SEGMENTS} KV segments, got {call.num_segments}")
    return reasons
