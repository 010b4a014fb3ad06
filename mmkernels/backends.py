"""Which backend serves which input, and why not (xFormers' dispatch pattern).

Each backend is an object that declares its limits once (device types, dtypes,
largest head dim, most segments, minimum CUDA capability) and answers
`not_supported_reasons(call) -> list[str]` from them; a subclass extends the
answer with what only it knows. An empty list means it can serve the call. The
default picks, in an order set per device type, the first backend with no
reasons. `backend=` or the `MMKERNELS_BACKEND` variable forces one; a forced
backend that can't serve the input raises with its reasons.

Selection has no side effects: it never imports kernels. A backend's kernels,
fake kernels and autograd are loaded by the op modules the first time they run
it (`mmkernels.ops.load_backend`). The C++/CUDA side takes the same limits from
csrc/common/limits.h (python_tests/test_limits.py checks that they agree).
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

# The contract's limits (DESIGN.md 2): every backend, every language.
MAX_SEGMENTS = 8
MAX_GPU_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

BACKENDS = ("cuda", "triton", "cpu", "reference")
# The C++ CPU kernel before the reference on CPU. On GPU Triton comes first:
# its kernels are autotuned for the GPU, the CUDA ones are the portable fallback.
DEFAULT_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


_SCHEMA = "mmkernels::cross_modal_attention_fwd"  # one op csrc/ops.cpp declares


def _load_extension() -> str | None:
    """None when mmkernels._C loaded, else why it did not."""
    if os.environ.get("MMKERNELS_NO_EXT") == "1":
        return "MMKERNELS_NO_EXT=1 is set"
    try:
        importlib.import_module("mmkernels._C")
    except ImportError as e:  # not built, or built against another torch
        return f"the C++ extension mmkernels._C is not available ({e})"
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key(_SCHEMA, "CPU")
    except RuntimeError:  # the operator does not exist
        return (f"mmkernels._C does not declare {_SCHEMA}: it was built from other sources "
                "(rebuild it: pip install --no-build-isolation -e .)")
    return None


# Settled once at import, so that dispatch is plain Python that torch.compile
# traces without graph breaks.
_EXTENSION_ERROR = _load_extension()
_KERNELS = {
    key: _EXTENSION_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key(_SCHEMA, key)
    for key in ("CPU", "CUDA")
}
_TRITON_ERROR = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def extension_error() -> str | None:
    return _EXTENSION_ERROR


def has_kernels(dispatch_key: str) -> bool:
    """Whether the extension registered kernels for "CPU" or "CUDA"."""
    return _KERNELS[dispatch_key]


CPU_ISA_LEVELS = ("baseline", "avx2", "avx512")


def cpu_isa(level: str | None = None) -> str | None:
    """The instruction-set level the CPU kernels run (baseline, avx2, avx512), chosen once when the
    extension loads (the best this CPU supports, or MMKERNELS_CPU_ISA's); None without CPU kernels.
    level sets it for this process (tests, benchmarks); a level the CPU lacks raises."""
    if _EXTENSION_ERROR is not None or not _KERNELS["CPU"]:
        return None
    if level is not None:
        if level not in CPU_ISA_LEVELS:
            raise ValueError(f"cpu_isa level must be one of {CPU_ISA_LEVELS}, got {level!r}")
        torch.ops.mmkernels.cpu_isa(CPU_ISA_LEVELS.index(level))
    return CPU_ISA_LEVELS[torch.ops.mmkernels.cpu_isa(-1)]


def cpu_isa_levels_here() -> Tuple[str, ...]:
    """The levels this CPU (and build) can run, baseline first."""
    if _EXTENSION_ERROR is not None or not _KERNELS["CPU"]:
        return ()
    return CPU_ISA_LEVELS[: torch.ops.mmkernels.cpu_isa(-2) + 1]


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
    key_masks: bool = False  # kv_masks given


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


@functools.lru_cache(maxsize=None)  # dispatch asks on every call; cached before any trace
def _cuda_capability_of(index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def _cuda_capability() -> Tuple[int, int]:
    # Read in eager only: a traced call has been dispatched eagerly before.
    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return (9, 0)
    return _cuda_capability_of(torch.cuda.current_device())


class Backend:
    """A backend and its declared limits; `not_supported_reasons` checks a call against them."""

    name: str = ""
    device_types: Tuple[str, ...] = ()       # empty: any device
    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES + (torch.float64,)
    max_head_dim: Optional[int] = None       # None: any
    max_segments: int = MAX_SEGMENTS
    min_capability: Optional[Tuple[int, int]] = None  # on CUDA tensors
    key_masks: bool = True                   # serves kv_masks

    def not_supported_reasons(self, call: Call) -> List[str]:
        reasons: List[str] = []
        if self.device_types and call.device_type not in self.device_types:
            where = " or ".join(t.upper() for t in self.device_types)
            reasons.append(f"the {self.name} backend runs on {where} tensors, got {call.device_type}")
        if call.dtype not in self.dtypes:
            reasons.append(f"the {self.name} backend supports {_dtype_names(self.dtypes)}, got {call.dtype}")
        if (self.max_head_dim is not None and call.op == "cross_modal_attention"
                and max(call.head_dim, call.value_dim) > self.max_head_dim):
            reasons.append(f"head dims up to {self.max_head_dim} on {self.name}, "
                           f"got D={call.head_dim}, Dv={call.value_dim}")
        if call.key_masks and not self.key_masks:
            reasons.append(f"key masks (kv_masks) are not implemented in the {self.name} kernels yet")
        if call.num_segments > self.max_segments:
            reasons.append(f"at most {self.max_segments} segments on {self.name}, got {call.num_segments}")
        if self.min_capability is not None and call.device_type == "cuda" and torch.cuda.is_available():
            cc = _cuda_capability()
            if cc < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                reasons.append(f"the {self.name} kernels need compute capability {need} or newer, "
                               f"got {cc[0]}.{cc[1]}")
        return reasons

    def limits(self) -> Dict[str, Any]:
        """The declared limits, for `python -m mmkernels.info` and the agreement test."""
        return {"devices": self.device_types or ("any",), "dtypes": _dtype_names(self.dtypes),
                "max_head_dim": self.max_head_dim, "max_segments": self.max_segments,
                "min_capability": self.min_capability, "key_masks": self.key_masks}


class ReferenceBackend(Backend):
    name = "reference"


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)

    def not_supported_reasons(self, call: Call) -> List[str]:
        reasons = super().not_supported_reasons(call)
        if extension_error() is not None:
            reasons.append(extension_error())
        elif not has_kernels("CPU"):
            reasons.append("mmkernels._C was built without CPU kernels")
        return reasons


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)
    dtypes = FLOAT_DTYPES
    max_head_dim = MAX_GPU_HEAD_DIM
    min_capability = (8, 0)

    def not_supported_reasons(self, call: Call) -> List[str]:
        reasons = super().not_supported_reasons(call)
        if extension_error() is not None:
            reasons.append(extension_error())
        elif not has_kernels("CUDA"):
            reasons.append("mmkernels._C was built without CUDA kernels "
                           "(no nvcc/GPU at build time; FORCE_CUDA=1 builds them)")
        return reasons


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


@functools.lru_cache(maxsize=None)
def _triton_interpreter_broken() -> str | None:
    """Triton's interpreter before 3.7 turns 1-element arrays into loop bounds with int(),
    which NumPy 2.4 refuses: every kernel with a data-dependent loop fails there. Read from
    the installed versions, without importing triton."""
    import numpy

    triton_version = importlib.metadata.version("triton")
    if _version(triton_version) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton_version} interpreter fails with NumPy {numpy.__version__} "
                "(needs triton >= 3.7 or numpy < 2.4)")
    return None


class TritonBackend(Backend):
    name = "triton"
    device_types = ("cuda", "cpu")  # CPU tensors under TRITON_INTERPRET=1 only (tests)
    dtypes = FLOAT_DTYPES
    max_head_dim = MAX_GPU_HEAD_DIM
    min_capability = (7, 5)
    min_capability_bf16 = (8, 0)

    def not_supported_reasons(self, call: Call) -> List[str]:
        if triton_error() is not None:
            return [triton_error()]
        if call.device_type == "cpu" and not triton_interpreted():
            return ["triton runs on CPU tensors only under TRITON_INTERPRET=1"]
        reasons = super().not_supported_reasons(call)
        if call.device_type == "cpu" and _triton_interpreter_broken():
            reasons.append(_triton_interpreter_broken())
        if call.device_type == "cuda" and torch.cuda.is_available() and call.dtype == torch.bfloat16:
            cc = _cuda_capability()
            if self.min_capability <= cc < self.min_capability_bf16:
                reasons.append(f"bf16 Triton kernels need compute capability 8.0 or newer, got {cc[0]}.{cc[1]}")
        return reasons


REGISTRY: Dict[str, Backend] = {b.name: b for b in (CudaBackend(), TritonBackend(), CpuBackend(), ReferenceBackend())}
assert tuple(REGISTRY) == BACKENDS


class BackendNotSupported(ValueError):
    pass


def get(backend: str) -> Backend:
    if backend not in REGISTRY:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return REGISTRY[backend]


def not_supported_reasons(backend: str, call: Call) -> List[str]:
    return get(backend).not_supported_reasons(call)


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
