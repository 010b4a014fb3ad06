"""Which backend serves which input, and why not (xFormers' dispatch pattern).

Each backend answers `not_supported_reasons(op, args) -> list[str]`; an empty
list means it can serve the call. The default picks, in an order set per
device type, the first backend with no reasons. `backend=` or the
`MMKERNELS_BACKEND` variable forces one; a forced backend that can't serve the
input raises with its reasons.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
# The C++ CPU kernel before the reference on CPU. On GPU Triton comes first:
# its kernels are autotuned for the GPU, the CUDA ones are the portable fallback.
DEFAULT_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SEGMENTS = 8
MAX_GPU_HEAD_DIM = 256


def _load_extension() -> str | None:
    """None when mmkernels._C loaded, else why it did not."""
    if os.environ.get("MMKERNELS_NO_EXT") == "1":
        return "MMKERNELS_NO_EXT=1 is set"
    try:
        importlib.import_module("mmkernels._C")
    except ImportError as e:  # not built, or built against another torch
        return f"the C++ extension mmkernels._C is not available ({e})"
    return None


# Settled once at import, so that dispatch is plain Python that torch.compile
# traces without graph breaks.
_EXTENSION_ERROR = _load_extension()
_KERNELS = {
    key: _EXTENSION_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key("mmkernels::cma_fwd", key)
    for key in ("CPU", "CUDA")
}
_TRITON_ERROR = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def extension_error() -> str | None:
    return _EXTENSION_ERROR


def has_kernels(dispatch_key: str) -> bool:
    """Whether the extension registered kernels for "CPU" or "CUDA"."""
    return _KERNELS[dispatch_key]


def triton_error() -> str | None:
    return _TRITON_ERROR


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Call:
    """What dispatch needs to know about one call: its device, dtype and head sizes."""

    op: str  # "cross_modal_attention" | "gated_fusion"
    device_type: str
    dtype: torch.dtype
    num_segments: int = 1
    head_dim: int = 0
    value_dim: int = 0


def _reference_reasons(call: Call) -> List[str]:
    return []


def _cpu_reasons(call: Call) -> List[str]:
    reasons = []
    if call.device_type != "cpu":
        reasons.append(f"the cpu backend runs on CPU tensors, got {call.device_type}")
    if extension_error() is not None:
        reasons.append(extension_error())
    elif not has_kernels("CPU"):
        reasons.append("mmkernels._C was built without CPU kernels")
    if call.dtype not in FLOAT_DTYPES + (torch.float64,):
        reasons.append(f"dtype {call.dtype} is not supported (fp32, fp16, bf16, fp64)")
    return reasons


def _gpu_common_reasons(call: Call, name: str) -> List[str]:
    reasons = []
    if call.dtype not in FLOAT_DTYPES:
        reasons.append(f"the {name} backend supports fp32, fp16 and bf16, got {call.dtype}")
    if call.op == "cross_modal_attention" and max(call.head_dim, call.value_dim) > MAX_GPU_HEAD_DIM:
        reasons.append(
            f"head dims up to {MAX_GPU_HEAD_DIM} on {name}, got D={call.head_dim}, Dv={call.value_dim}"
        )
    return reasons


def _cuda_capability() -> tuple:
    # Read in eager only: a traced call has been dispatched eagerly before.
    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return (9, 0)
    return torch.cuda.get_device_capability()


def _cuda_reasons(call: Call) -> List[str]:
    reasons = []
    if call.device_type != "cuda":
        reasons.append(f"the cuda backend runs on CUDA tensors, got {call.device_type}")
    elif _cuda_capability() < (8, 0):
        reasons.append(f"the CUDA kernels need compute capability 8.0 or newer, got {_cuda_capability()}")
    if extension_error() is not None:
        reasons.append(extension_error())
    elif not has_kernels("CUDA"):
        reasons.append("mmkernels._C was built without CUDA kernels (no nvcc/GPU at build time; FORCE_CUDA=1 builds them)")
    return reasons + _gpu_common_reasons(call, "cuda")


def _triton_reasons(call: Call) -> List[str]:
    reasons = []
    if triton_error() is not None:
        return [triton_error()]
    if call.device_type == "cpu" and not triton_interpreted():
        reasons.append("triton runs on CPU tensors only under TRITON_INTERPRET=1")
    elif call.device_type not in ("cpu", "cuda"):
        reasons.append(f"triton runs on CUDA tensors, got {call.device_type}")
    reasons += _gpu_common_reasons(call, "triton")
    if not reasons:
        # Kernel-specific limits live beside the kernels.
        from mmkernels import triton as mm_triton

        reasons += mm_triton.not_supported_reasons(call)
    return reasons


REASONS: Dict[str, Callable[[Call], List[str]]] = {
    "reference": _reference_reasons,
    "cpu": _cpu_reasons,
    "cuda": _cuda_reasons,
    "triton": _triton_reasons,
}


class BackendNotSupported(ValueError):
    pass


def not_supported_reasons(backend: str, call: Call) -> List[str]:
    if backend not in REASONS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return REASONS[backend](call)


def select(call: Call, backend: str | None = None) -> str:
    """The backend that serves `call`: the forced one, or the first able in the device's order."""
    forced = backend or os.environ.get("MMKERNELS_BACKEND") or None
    if forced is not None:
        reasons = not_supported_reasons(forced, call)
        if reasons:
            raise BackendNotSupported(
                f"backend {forced!r} cannot run {call.op}: " + "; ".join(reasons)
            )
        return forced
    order = DEFAULT_ORDER.get(call.device_type, ("reference",))
    for name in order:
        if not not_supported_reasons(name, call):
            return name
    return "reference"


def describe(call: Call) -> Dict[str, Any]:
    """Every backend's verdict on `call`: used by `python -m mmkernels.info`."""
    return {name: not_supported_reasons(name, call) for name in BACKENDS}
