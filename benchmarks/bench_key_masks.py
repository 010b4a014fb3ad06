"""cross_modal_attention with key masks vs SDPA with the mask transformers builds, side by side in one run.

The attention calls where real models pad, at BERT-base width (12 heads of 64):

* left-padded causal decoder prefill: `causal=True, kv_masks=[key mask]` vs SDPA with the
  (B, 1, L, L) boolean mask (key mask & causal triangle);
* text queries over padded image patches (holes): `kv_masks=[patch mask]` vs SDPA with the
  (B, 1, 1, Lk) mask;
* a perceiver resampler, latents over context + latents: two segments, no concatenation,
  `kv_masks=[context mask, None]` vs SDPA on the concatenated keys and values (the
  concatenation is paid in forward+backward, as in a training step) with the mask.

Forward and forward+backward medians, timed round-robin, and the speedup over SDPA.

    python benchmarks/bench_key_masks.py            # the table of benchmarks/README.md
    python benchmarks/bench_key_masks.py --quick    # first case, 5 repetitions
    python benchmarks/bench_key_masks.py --keep-heap  # no page faults from glibc's heap trimming
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import KEEP_HEAP_HELP, bar_plot, interleaved_median_ms, keep_heap, write_report  # noqa: E402

import mmkernels  # noqa: E402

H, D = 12, 64


def _left_pad_mask(g, B, L, max_frac):
    pad = (L * max_frac * torch.rand(B, generator=g)).long()
    return torch.arange(L)[None, :] >= pad[:, None]


def _holes_mask(g, B, L, frac):
    return torch.rand(B, L, generator=g) >= frac


def cases(g, device, dtype):
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    B, L = 8, 256
    x = [r(B, L, H, D) for _ in range(3)]
    km = _left_pad_mask(g, B, L, 0.5).to(device)
    tri = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    yield (f"causal prefill, left padding <= 50%: B{B} L{L}", x, [km], True, None,
           (km[:, None, None, :] & tri)[:, :, :, :])
    B, Lq, Lk = 8, 64, 576
    q, k, v = r(B, Lq, H, D), r(B, Lk, H, D), r(B, Lk, H, D)
    pm = _holes_mask(g, B, Lk, 0.3).to(device)
    yield f"text over image patches, 30% holes: B{B} Lq{Lq} Lk{Lk}", [q, k, v], [pm], False, None, pm[:, None, None, :]
    B, Lat, Lc = 8, 64, 576
    lat, ctx_k, ctx_v, lat_k, lat_v = r(B, Lat, H, D), r(B, Lc, H, D), r(B, Lc, H, D), r(B, Lat, H, D), r(B, Lat, H, D)
    cm = _left_pad_mask(g, B, Lc, 0.5).flip(1).to(device)  # right-padded context
    full = torch.cat([cm, torch.ones(B, Lat, dtype=torch.bool, device=device)], 1)
    yield (f"perceiver, latents over context + latents: B{B} {Lat} over {Lc}+{Lat}", [lat, ctx_k, ctx_v, lat_k, lat_v],
           [cm, None], False, "two_segments", full[:, None, None, :])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="first case, 5 repetitions")
    ap.add_argument("--keep-heap", action="store_true", help=KEEP_HEAP_HELP)
    args = ap.parse_args(argv)
    heap = "kept (--keep-heap)" if args.keep_heap and keep_heap() else "glibc defaults"
    dtype = getattr(torch, args.dtype)
    reps = 5 if args.quick else args.reps
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, (name, tensors, masks, causal, layout, sdpa_mask) in enumerate(cases(g, args.device, dtype)):
        if args.quick and n:
            break
        leaves = [t.detach().requires_grad_(True) for t in tensors]

        def ours(leaves=leaves, masks=masks, causal=causal, layout=layout):
            if layout == "two_segments":
                q, ck, cv, lk, lv = leaves
                return mmkernels.cross_modal_attention(q, [ck, lk], [cv, lv], kv_masks=masks)
            q, k, v = leaves
            return mmkernels.cross_modal_attention(q, [k], [v], kv_masks=masks, causal=causal)

        def sdpa(leaves=leaves, layout=layout, sdpa_mask=sdpa_mask):
            if layout == "two_segments":
                q, ck, cv, lk, lv = leaves
                k, v = torch.cat([ck, lk], 1), torch.cat([cv, lv], 1)
            else:
                q, k, v = leaves
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=sdpa_mask)
            return out.transpose(1, 2)

        # same answer on the rows that have a key (SDPA's rows without one are NaN or 0)
        with torch.no_grad():
            a, b = ours(), sdpa()
            ok = torch.isfinite(b).all(-1)
            torch.testing.assert_close(a[ok], b[ok], atol=2e-3 if dtype != torch.float32 else 2e-5, rtol=2e-3)
        grad = torch.randn(a.shape, generator=g).to(args.device, dtype)

        def fwd(fn):
            with torch.no_grad():
                fn()

        def fwd_bwd(fn):
            out = fn()
            torch.autograd.grad(out, leaves, grad)

        variants = {"mmkernels": ours, "sdpa": sdpa}
        t_f = interleaved_median_ms({k: (lambda f=f: fwd(f)) for k, f in variants.items()}, reps=reps,
                                    device=args.device)
        t_fb = interleaved_median_ms({k: (lambda f=f: fwd_bwd(f)) for k, f in variants.items()}, reps=reps,
                                     device=args.device)
        for k in variants:
            rows.append({"case": name, "variant": k, "fwd_ms": t_f[k], "fwd_bwd_ms": t_fb[k],
                         "fwd_speedup_vs_sdpa": t_f["sdpa"] / t_f[k], "fwd_bwd_speedup_vs_sdpa": t_fb["sdpa"] / t_fb[k]})
    cols = ["case", "variant", "fwd_ms", "fwd_bwd_ms", "fwd_speedup_vs_sdpa", "fwd_bwd_speedup_vs_sdpa"]
    notes = [f"device {args.device}, {args.dtype}, {H} heads of {D}, medians of {reps} round-robin repetitions, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, heap: {heap}"]
    md = write_report("key_masks", rows, cols, "cross_modal_attention with key masks vs SDPA with the mask", notes)
    bar_plot("key_masks", [f"{r['case'][:22]} {r['variant']}" for r in rows], [r["fwd_bwd_ms"] for r in rows],
             "forward+backward ms", "key masks: mmkernels vs SDPA")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
