"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here.

A machine without a GPU can still run Triton's whole compiler for sm_90 (ptxas
included): that catches compiled-mode typing errors the interpreter lets
through, and the cubin's resource usage (registers, spills, shared memory)
tells which autotune configs can fit a Hopper SM before any GPU time is spent.
Used by python_tests/test_triton.py and benchmarks/triton_resources.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Dict, Iterable, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Scalars whose names are upper case (the kernels' other upper-case arguments are pointers).
_UPPER_SCALARS = {"G", "N", "H", "NH"}
# Launch-time values Triton specializes as multiples of 16 for the usual contiguous
# bf16 inputs with head dims of 64/128: pointers and the strides (names s*).
_DIV16 = re.compile(r"^s[a-z0-9]+$")

# Largest shared memory one program may take on sm_90 (227 KiB of the 228 per SM).
SM90_MAX_SHARED = 227 * 1024


def _kernel_fn(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):  # Autotuner / Heuristics wrap it
        kernel = kernel.fn
    return kernel


def compile_sm90(kernel, consts: Dict[str, object], ptr_types: Dict[str, str], floats: Iterable[str] = (),
                 num_warps: int = 4, num_stages: int = 2, capability: int = 90):
    """Compiles `kernel` for CUDA `capability` with `consts` as its constexprs.
    ptr_types maps pointer argument names to Triton types ("*bf16"); key "*" is the default."""
    fn = _kernel_fn(kernel)
    floats = set(floats)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in floats:
            sig[name] = "fp32"
        elif name.isupper() and not name.startswith("LK") and name not in _UPPER_SCALARS:
            sig[name] = ptr_types.get(name, ptr_types["*"])
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if _DIV16.match(name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _cuobjdump() -> Optional[str]:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def resource_usage(compiled) -> Dict[str, object]:
    """Registers, spill stack/local bytes, shared memory (static + Triton's dynamic) and whether
    the matrix products use Hopper's wgmma (HGMMA in SASS) or the older mma (HMMA)."""
    usage: Dict[str, object] = {"shared": int(compiled.metadata.shared)}
    tool = _cuobjdump()
    cubin = compiled.asm.get("cubin")
    if tool is None or cubin is None:
        return usage
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True).stdout
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", res)
        if m:
            usage[key.lower()] = int(m.group(1))
    usage["hgmma"] = sass.count("HGMMA")
    usage["hmma"] = sass.count("HMMA")
    return usage
