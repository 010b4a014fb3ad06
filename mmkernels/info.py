"""`python -m mmkernels.info`: what was built, what is available here, and why not."""
from __future__ import annotations

import platform

import torch

from mmkernels import backends

_SAMPLE_CALLS = [
    backends.Call("cross_modal_attention", "cpu", torch.float32, 2, 64, 64),
    backends.Call("cross_modal_attention", "cpu", torch.float64, 2, 64, 64),
    backends.Call("cross_modal_attention", "cuda", torch.bfloat16, 3, 128, 128),
    backends.Call("gated_fusion", "cpu", torch.float32, 3),
    backends.Call("gated_fusion", "cuda", torch.bfloat16, 3),
]


def _kernels() -> str:
    if backends.extension_error() is not None:
        return f"not loaded: {backends.extension_error()}"
    keys = [k for k in ("CPU", "CUDA") if backends.has_kernels(k)]
    return "loaded, kernels for " + ", ".join(keys)


def _cpu_isa() -> str:
    try:
        level = backends.cpu_isa()
    except RuntimeError as e:  # MMKERNELS_CPU_ISA names a level this CPU lacks
        return f"error: {str(e).splitlines()[0]}"
    if level is None:
        return "none (no CPU kernels)"
    return f"{level} (this CPU runs: {', '.join(backends.cpu_isa_levels_here())}; MMKERNELS_CPU_ISA forces one)"


def report() -> str:
    lines = [
        f"mmkernels {__import__('mmkernels').__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
        f" GPU visible: {torch.cuda.is_available()}",
        f"extension mmkernels._C: {_kernels()}",
        f"CPU kernels' instruction set: {_cpu_isa()}",
        f"triton: {backends.triton_error() or __import__('triton').__version__}"
        + (" (interpreter: TRITON_INTERPRET=1)" if backends.triton_interpreted() else ""),
        "",
        "declared limits:",
    ]
    for name, backend in backends.REGISTRY.items():
        lim = backend.limits()
        cc = lim["min_capability"]
        lines.append(f"- {name:9s} devices {'/'.join(lim['devices'])}; {lim['dtypes']}; "
                     f"head dim {lim['max_head_dim'] or 'any'}; M <= {lim['max_segments']}"
                     + (f"; CUDA capability >= {cc[0]}.{cc[1]}" if cc else ""))
    lines += ["", "backend per call (the first able one in the device's order serves it):"]
    for call in _SAMPLE_CALLS:
        try:
            chosen = backends.select(call)
        except ValueError as e:  # a forced backend that can't serve it
            chosen = f"error: {e}"
        lines.append(f"- {call.op} on {call.device_type} {str(call.dtype).replace('torch.', '')}"
                     f" (M={call.num_segments}, D={call.head_dim}): {chosen}")
        for name, reasons in backends.describe(call).items():
            lines.append(f"    {name:9s} " + ("ok" if not reasons else "no: " + "; ".join(reasons)))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
