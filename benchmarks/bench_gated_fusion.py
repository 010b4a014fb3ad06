"""gated_fusion vs the same computation in eager PyTorch and under torch.compile, side by side in one run.

Reports medians of forward and forward+backward, the effective memory traffic
(GB/s: forward reads features and logits and writes the output; backward reads
them again with the output's gradient and writes two gradients) and the speedup.

    python benchmarks/bench_gated_fusion.py
    python benchmarks/bench_gated_fusion.py --quick      # first shape, no torch.compile
    python benchmarks/bench_gated_fusion.py --isa        # the CPU kernels at each instruction-set level
                                                         # this CPU runs, as a fraction of a copy's bandwidth

With --isa, each level (baseline, avx2, avx512) and a plain copy of the same tensors
(torch.clone of features and logits: read and write) are timed round-robin in one
run; the fraction is the kernel's bytes per second over the copy's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmkernels  # noqa: E402
from common import bar_plot, interleaved_median_ms, write_report  # noqa: E402

SHAPES = [(3, 32768, 768), (2, 8192, 1024), (4, 4096, 512)]


def eager(features, gate_logits, present):
    """What a user writes without mmkernels: masked softmax over modalities, tanh, weighted sum."""
    logits = gate_logits.masked_fill(~present[..., None], float("-inf"))
    gates = torch.softmax(logits, dim=0).nan_to_num(0.0)
    return (gates * torch.tanh(features)).sum(0)


def bench(M, N, H, args):
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(M, N, H, generator=g).to(dtype=dtype, device=args.device)
    lg = torch.randn(M, N, H, generator=g).to(dtype=dtype, device=args.device)
    present = (torch.rand(M, N, generator=g) > 0.2).to(args.device)
    grad = torch.randn(N, H, generator=g).to(dtype=dtype, device=args.device)
    esize = f.element_size()
    fwd_bytes = (2 * M + 1) * N * H * esize
    bwd_bytes = (4 * M + 1) * N * H * esize
    variants = {
        "mmkernels": lambda a, b: mmkernels.gated_fusion(a, b, present, backend=args.backend),
        "eager": lambda a, b: eager(a, b, present),
    }
    if args.compile:  # inductor fuses the eager graph: the strongest thing a user gets for free
        compiled = torch.compile(eager, dynamic=False)
        variants["torch.compile(eager)"] = lambda a, b: compiled(a, b, present)
    fr, lr = f.detach().requires_grad_(), lg.detach().requires_grad_()
    fwd_ms = interleaved_median_ms({n: torch.no_grad()(lambda fn=fn: fn(f, lg)) for n, fn in variants.items()},
                                   reps=args.reps, device=args.device)
    both_ms = interleaved_median_ms(
        {n: (lambda fn=fn: torch.autograd.grad(fn(fr, lr), [fr, lr], grad)) for n, fn in variants.items()},
        reps=args.reps, device=args.device)
    rows = []
    for name in variants:
        fwd, both = fwd_ms[name], both_ms[name]
        rows.append(dict(shape=f"M={M} N={N} H={H}", variant=name, fwd_ms=fwd, fwd_bwd_ms=both,
                         fwd_GBps=fwd_bytes / fwd / 1e6, fwd_bwd_GBps=(fwd_bytes + bwd_bytes) / both / 1e6))
    for r in rows:
        r["fwd_speedup_vs_eager"] = rows[1]["fwd_ms"] / r["fwd_ms"]
        r["fwd_bwd_speedup_vs_eager"] = rows[1]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


def bench_isa_levels(M, N, H, reps):
    """fp32 forward and forward+backward at each CPU ISA level, against a copy's bandwidth, round-robin."""
    from mmkernels import backends

    levels = backends.cpu_isa_levels_here()
    before = backends.cpu_isa()
    g = torch.Generator().manual_seed(0)
    f, lg = torch.randn(M, N, H, generator=g), torch.randn(M, N, H, generator=g)
    fr, lr = f.clone().requires_grad_(True), lg.clone().requires_grad_(True)
    grad = torch.randn(N, H, generator=g)

    def at(level, fn):
        def run():
            backends.cpu_isa(level)
            fn()
        return run

    def fwd():
        mmkernels.gated_fusion(f, lg, backend="cpu")

    def fwd_bwd():
        torch.autograd.grad(mmkernels.gated_fusion(fr, lr, backend="cpu"), [fr, lr], grad)

    fns = {"copy": lambda: (f.clone(), lg.clone())}
    for level in levels:
        fns[f"{level} fwd"] = at(level, fwd)
        fns[f"{level} fwd+bwd"] = at(level, fwd_bwd)
    try:
        t = interleaved_median_ms(fns, reps=reps)
    finally:
        backends.cpu_isa(before)
    elem = M * N * H * 4
    copy_gbps = 4 * elem / (t["copy"] * 1e-3) / 1e9
    bytes_fwd = 2 * elem + N * H * 4                    # read features, logits; write fused
    bytes_fb = bytes_fwd + 2 * elem + N * H * 4 + 2 * elem  # backward: read them again and grad; write two grads
    rows = []
    for level in levels:
        for kind, nbytes in (("fwd", bytes_fwd), ("fwd+bwd", bytes_fb)):
            ms = t[f"{level} {kind}"]
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append({"shape": f"M={M} N={N} H={H}", "isa": level, "pass": kind, "ms": ms, "GBps": gbps,
                         "copy_GBps": copy_gbps, "fraction_of_copy": gbps / copy_gbps})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--backend", default=None)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="first shape, 5 repetitions, no torch.compile")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile baseline")
    p.add_argument("--isa", action="store_true", help="the CPU kernels at each ISA level vs a copy's bandwidth")
    args = p.parse_args(argv)
    if args.isa:
        rows = []
        for shape in SHAPES[:1] if args.quick else SHAPES:
            rows += bench_isa_levels(*shape, 5 if args.quick else args.reps)
        md = write_report("gated_fusion_isa", rows, ["shape", "isa", "pass", "ms", "GBps", "copy_GBps",
                                                     "fraction_of_copy"], "gated_fusion by CPU ISA level",
                          [f"fp32, medians of {args.reps} round-robin repetitions with a copy of the same tensors, "
                           f"{torch.get_num_threads()} threads"])
        print(md.read_text())
        return
    if args.quick:
        args.reps = 5
        args.compile = False
    rows = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        rows += bench(*shape, args)
    cols = ["shape", "variant", "fwd_ms", "fwd_bwd_ms", "fwd_GBps", "fwd_bwd_GBps", "fwd_speedup_vs_eager",
            "fwd_bwd_speedup_vs_eager"]
    md = write_report("gated_fusion_" + args.device, rows, cols, "gated_fusion",
                      [f"device {args.device}, {args.dtype}, medians of {args.reps}, {torch.get_num_threads()} threads",
                       "GB/s: bytes that one pass must move / time"])
    print(md.read_text())
    bar_plot("gated_fusion_" + args.device, [f"{r['variant']}\n{r['shape']}" for r in rows],
             [r["fwd_bwd_ms"] for r in rows], "forward+backward ms (median)", "gated_fusion")


if __name__ == "__main__":
    main()
