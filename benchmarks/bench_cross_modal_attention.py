"""cross_modal_attention vs what a user would otherwise call, side by side in one run.

Baselines: F.scaled_dot_product_attention on the concatenated KV with a boolean
padding mask (as (B, H, L, D) views of the (B, L, H, D) projections, and made
contiguous), the eager math path, torch.compile of the reference (--no-compile
skips it) and FlexAttention with a padding block mask (compiled; forward only
on the CPU, which has no FlexAttention backward; --no-flex skips it).
Reports medians, GFLOP/s on valid tokens (forward 4*Lq*Lk*D per head, backward
2.5x), each as a fraction of a large matrix product's rate measured in the same
run, the speedup of mmkernels over the best baseline, and peak extra memory;
then the per-call cost in microseconds at one query over one key (overhead only)
and at the fusion model's text shape, against SDPA.

    python benchmarks/bench_cross_modal_attention.py            # the CPU table of benchmarks/README.md
    python benchmarks/bench_cross_modal_attention.py --quick    # one shape, few repetitions
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmkernels  # noqa: E402
from common import bar_plot, interleaved_median_ms, matmul_gflops, peak_cpu_memory_bytes, write_report  # noqa: E402
from mmkernels.reference import cross_modal_attention_reference  # noqa: E402

# (name, B, Hq, Hkv, D, Lq, segment lengths, max padding fraction)
SHAPES = [
    ("text64 x img576+aud1500", 4, 8, 8, 64, 64, (576, 1500), 0.4),
    ("text128 x img196+aud1000+aud500", 2, 8, 4, 64, 128, (196, 1000, 500), 0.5),
    ("text32 x img1024", 8, 12, 12, 64, 32, (1024,), 0.3),
    ("text128 x img1024+aud3000 (D128)", 2, 8, 8, 128, 128, (1024, 3000), 0.5),
]
QUICK_SHAPES = SHAPES[:1]


def make_inputs(B, Hq, Hkv, D, Lq, segs, pad, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype=dtype, device=device)
    keys = [torch.randn(B, L, Hkv, D, generator=g).to(dtype=dtype, device=device) for L in segs]
    values = [torch.randn(B, L, Hkv, D, generator=g).to(dtype=dtype, device=device) for L in segs]
    # Each sample keeps 60-100% of each segment: padding at the end.
    keep = 1 - pad * torch.rand(B, len(segs), generator=g)
    kv_lengths = (keep * torch.tensor(segs)).long().clamp(min=1).to(device)
    return q, keys, values, kv_lengths


def concat_with_mask(keys, values, kv_lengths, Hq):
    """What a user does without mmkernels: one KV sequence and a boolean mask."""
    k = torch.cat(keys, dim=1)
    v = torch.cat(values, dim=1)
    masks = [torch.arange(t.shape[1], device=t.device)[None] < kv_lengths[:, m:m + 1] for m, t in enumerate(keys)]
    mask = torch.cat(masks, dim=1)[:, None, None, :]  # (B, 1, 1, Lk)
    group = Hq // k.shape[2]
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    return k, v, mask


def sdpa(q, k, v, mask, contiguous):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if contiguous:
        qt, kt, vt = qt.contiguous(), kt.contiguous(), vt.contiguous()
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


def math_path(q, k, v, mask):
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def flex_attention_fn(mask, B, Lq, Lk, device, gqa):
    """FlexAttention (compiled) with a block mask built once from the padding mask; None where
    this torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    valid = mask[:, 0, 0, :].contiguous()  # (B, Lk)

    def mask_mod(b, h, q_idx, kv_idx):
        return valid[b, kv_idx]

    block_mask = create_block_mask(mask_mod, B, None, Lq, Lk, device=device)
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=gqa)
        return out.transpose(1, 2)
    return run


def _fwd_bwd(fn, inputs, grad_out):
    def run():
        out = fn()
        return torch.autograd.grad(out, inputs, grad_out)
    return run


def bench_shape(name, B, Hq, Hkv, D, Lq, segs, pad, args, gflops_peak):
    dtype = getattr(torch, args.dtype)
    q, keys, values, kv_lengths = make_inputs(B, Hq, Hkv, D, Lq, segs, pad, dtype, args.device)
    k, v, mask = concat_with_mask(keys, values, kv_lengths, Hq)
    valid = kv_lengths.sum(1).double()
    flops = float((4 * Lq * valid * D * Hq).sum())
    variants = {
        # mmkernels and the compiled reference take the per-modality lists as they are.
        "mmkernels": lambda q, ks, vs: mmkernels.cross_modal_attention(q, ks, vs, kv_lengths=kv_lengths,
                                                                       backend=args.backend),
        "sdpa (views)": lambda q, k, v: sdpa(q, k, v, mask, False),
        "sdpa (contiguous)": lambda q, k, v: sdpa(q, k, v, mask, True),
        "math": lambda q, k, v: math_path(q, k, v, mask),
    }
    if args.compile:
        compiled_ref = torch.compile(cross_modal_attention_reference)
        variants["compiled reference"] = lambda q, ks, vs: compiled_ref(q, ks, vs, kv_lengths)
    no_backward = set()
    if args.flex:
        flex = flex_attention_fn(mask, B, Lq, k.shape[1], args.device, gqa=False)
        if flex is not None:
            variants["flex attention"] = flex
            if args.device == "cpu":
                no_backward.add("flex attention")  # FlexAttention has no CPU backward
    fwd_runs, fwd_bwd_runs = {}, {}
    for vname, fn in variants.items():
        own = vname in ("mmkernels", "compiled reference")
        fwd_args = (q, keys, values) if own else (q, k, v)
        fwd_runs[vname] = torch.no_grad()(lambda fn=fn, a=fwd_args: fn(*a))
        # Backward: grads w.r.t. q and the user's own (per-modality) K/V tensors.
        qg = q.detach().requires_grad_()
        kg = [t.detach().requires_grad_() for t in keys]
        vg = [t.detach().requires_grad_() for t in values]
        if own:
            path = lambda fn=fn, qg=qg, kg=kg, vg=vg: fn(qg, kg, vg)  # noqa: E731
        else:
            def path(fn=fn, qg=qg, kg=kg, vg=vg):  # the concatenation is part of what the user pays
                kk, vv, _ = concat_with_mask(kg, vg, kv_lengths, Hq)
                return fn(qg, kk, vv)
        if vname not in no_backward:
            fwd_bwd_runs[vname] = _fwd_bwd(path, [qg, *kg, *vg], torch.randn(B, Lq, Hq, D, dtype=dtype))
    fwd_ms = interleaved_median_ms(fwd_runs, reps=args.reps, device=args.device)
    fwd_bwd_ms = interleaved_median_ms(fwd_bwd_runs, reps=args.reps, device=args.device)
    rows = []
    for vname in variants:
        fwd, fwd_bwd = fwd_ms[vname], fwd_bwd_ms.get(vname)
        rows.append(dict(shape=name, variant=vname, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                         fwd_gflops=flops / fwd / 1e6,
                         fwd_bwd_gflops=None if fwd_bwd is None else 3.5 * flops / fwd_bwd / 1e6,
                         fwd_frac_of_matmul=flops / fwd / 1e6 / gflops_peak))
    best_fwd = min(r["fwd_ms"] for r in rows if r["variant"] != "mmkernels")
    best_both = min(r["fwd_bwd_ms"] for r in rows if r["variant"] != "mmkernels" and r["fwd_bwd_ms"] is not None)
    for r in rows:
        r["fwd_speedup_vs_best"] = best_fwd / r["fwd_ms"]
        r["fwd_bwd_speedup_vs_best"] = None if r["fwd_bwd_ms"] is None else best_both / r["fwd_bwd_ms"]
    return rows


# (name, B, H, L, D): the same L queries and keys, lengths up to L
OVERHEAD_SHAPES = [
    ("one query over one key", 1, 1, 1, 16),
    ("BERT tiny layer: B64 L24 H4 D16", 64, 4, 24, 16),
]


def bench_overhead(args):
    """What a call costs beyond its arithmetic: at one query over one key that is all it costs (the
    Python entry point, dispatch, autograd, the kernel's setup), against SDPA's in the same run;
    at the fusion model's text shape, the same calls with their work. Microseconds."""
    dtype = getattr(torch, args.dtype)
    rows = []
    for name, B, H, L, D in OVERHEAD_SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, L, H, D, generator=g).to(dtype=dtype, device=args.device) for _ in range(3))
        lengths = torch.randint(max(L // 2, 1), L + 1, (B, 1), generator=g).to(args.device)
        mask = (torch.arange(L)[None, :] < lengths.cpu())[:, None, None, :].to(args.device)
        grad = torch.randn(B, L, H, D, generator=g).to(dtype=dtype, device=args.device)
        variants = {
            "mmkernels": lambda q, k, v: mmkernels.cross_modal_attention(q, [k], [v], kv_lengths=lengths,
                                                                       backend=args.backend),
            "sdpa (views)": lambda q, k, v: sdpa(q, k, v, mask, False),
        }
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        fwd = {n: torch.no_grad()(lambda f=f: f(q, k, v)) for n, f in variants.items()}
        fwd_bwd = {n: _fwd_bwd(lambda f=f: f(*leaves), leaves, grad) for n, f in variants.items()}
        reps = max(args.reps, 5) * 20
        t_f = interleaved_median_ms(fwd, reps=reps, warmup=20, device=args.device)
        t_fb = interleaved_median_ms(fwd_bwd, reps=reps, warmup=20, device=args.device)
        for n in variants:
            rows.append(dict(shape=name, variant=n, fwd_us=t_f[n] * 1e3, fwd_bwd_us=t_fb[n] * 1e3))
    return rows


MEMORY_VARIANTS = ("mmkernels", "sdpa (views)", "math")


def _memory_child(variant, args):
    """Runs in a fresh process: peak resident memory that one forward call adds."""
    dtype = getattr(torch, args.dtype)
    B, H, D, Lq, Lk = 1, 8, 64, 512, 16384
    q, keys, values, kv_lengths = make_inputs(B, H, H, D, Lq, (Lk,), 0.0, dtype, args.device)
    k, v, mask = concat_with_mask(keys, values, kv_lengths, H)
    fn = {
        "mmkernels": lambda: mmkernels.cross_modal_attention(q, keys, values, kv_lengths=kv_lengths, backend=args.backend),
        "sdpa (views)": lambda: sdpa(q, k, v, mask, False),
        "math": lambda: math_path(q, k, v, mask),
    }[variant]
    with torch.no_grad():
        peak = peak_cpu_memory_bytes(fn)
    out_bytes = q.numel() * q.element_size()
    print(-1 if peak is None else max(peak - out_bytes, 0))


def bench_memory(args):
    """Peak memory beyond inputs and outputs, Lq = 512 over one segment of 16384 keys.

    Each variant runs once in its own process: memory freed by an earlier call
    stays resident and would hide the next call's allocations.
    """
    import subprocess

    rows = []
    for variant in MEMORY_VARIANTS:
        cmd = [sys.executable, __file__, "--memory-child", variant, "--dtype", args.dtype, "--device", args.device]
        if args.backend:
            cmd += ["--backend", args.backend]
        peak = int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
        rows.append(dict(variant=variant, extra_MiB=None if peak < 0 else peak / 2**20))
    math_mib = rows[-1]["extra_MiB"]
    for r in rows:
        r["fraction_of_math"] = None if not math_mib or r["extra_MiB"] is None else r["extra_MiB"] / math_mib
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--backend", default=None, help="force an mmkernels backend (default: dispatch)")
    p.add_argument("--reps", type=int, default=15, help="repetitions per median")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip torch.compile of the reference (a minute or two of compiling per shape)")
    p.add_argument("--no-flex", dest="flex", action="store_false", help="skip FlexAttention (compiled)")
    p.add_argument("--quick", action="store_true", help="first shape only, 5 repetitions, no memory case")
    p.add_argument("--skip-memory", action="store_true", help="no memory case")
    p.add_argument("--memory-child", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return _memory_child(args.memory_child, args)
    if args.quick:
        args.reps = 5
        args.compile = args.flex = False
    torch.manual_seed(0)
    gflops_peak = matmul_gflops(device=args.device)
    print(f"matrix product (2048^2, fp32): {gflops_peak:.1f} GFLOP/s; threads: {torch.get_num_threads()}")
    rows = []
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        rows += bench_shape(*shape, args, gflops_peak)

    cols = ["shape", "variant", "fwd_ms", "fwd_bwd_ms", "fwd_gflops", "fwd_bwd_gflops", "fwd_frac_of_matmul",
            "fwd_speedup_vs_best", "fwd_bwd_speedup_vs_best"]
    notes = [f"device {args.device}, {args.dtype}, medians of {args.reps}, {torch.get_num_threads()} threads",
             f"matrix product rate in the same run: {gflops_peak:.1f} GFLOP/s",
             "GFLOP/s on valid keys only (forward 4*Lq*Lk*D per head, forward+backward 3.5x that)",
             "speedup = best baseline's time / this variant's time (baselines: every other row)",
             "flex attention: forward only on the CPU (FlexAttention has no CPU backward)"]
    md = write_report("attention_" + args.device, rows, cols, "cross_modal_attention", notes)
    print(md.read_text())
    overhead = bench_overhead(args)
    md = write_report("attention_overhead_" + args.device, overhead, ["shape", "variant", "fwd_us", "fwd_bwd_us"],
                      "Per-call cost (us, medians, round-robin)",
                      ["forward without grad; forward+backward through autograd (torch.autograd.grad)",
                       "mmkernels with kv_lengths, SDPA with the boolean padding mask"])
    print(md.read_text())
    bar_plot("attention_" + args.device, [f"{r['variant']}\n{r['shape'][:18]}" for r in rows],
             [r["fwd_bwd_ms"] or 0 for r in rows], "forward+backward ms (median)", "cross_modal_attention")
    if not (args.quick or args.skip_memory):
        mem = bench_memory(args)
        md = write_report("attention_memory_" + args.device, mem, ["variant", "extra_MiB", "fraction_of_math"],
                          "Peak memory beyond inputs and outputs (B=1, H=8, D=64, Lq=512, Lk=16384, forward)",
                          ["measured as the rise of peak resident memory (VmHWM) during the call"])
        print(md.read_text())


if __name__ == "__main__":
    main()
