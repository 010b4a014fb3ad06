"""A transformers BERT encoder on attn_implementation="mmkernels" vs "sdpa" vs "eager": one
model, its implementation switched (untimed) before each call, right-padded batches, side by side in
one run (round-robin medians).

Shapes: the fusion model's text encoder (short questions), and a BERT-base-width
encoder over long padded inputs (where skipping the padded keys pays).

    python benchmarks/bench_transformers.py [--reps 10] [--quick] [--device cpu] [--keep-heap]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, if not installed

from common import KEEP_HEAP_HELP, bar_plot, interleaved_median_ms, keep_heap, write_report  # noqa: E402

import mmkernels.integrations.transformers as mmhf  # noqa: E402

# (name, hidden, heads, layers, batch, seq, max padding fraction, repetitions per --reps): the small
# encoder's calls take ~10 ms and move by 5-10% from call to call (allocator, caches, the VM), so it
# takes ten times the repetitions, for a few seconds in all.
SHAPES = [
    ("fusion text encoder", 64, 4, 2, 64, 24, 0.5, 10),
    ("BERT-base width, long padded inputs", 768, 12, 2, 8, 512, 0.6, 1),
]
IMPLS = ("mmkernels", "sdpa", "eager")


def make_model(hidden, heads, layers, device):
    """One BERT encoder for every implementation: the variants share its weights in memory, so they differ
    only in the attention path (with a copy each, the rest of the small encoder, identical code, took
    0.07-0.62 ms more in one copy than in the other: as much as the attention's whole gain there)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=1000, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                     intermediate_size=4 * hidden, max_position_embeddings=512, attention_probs_dropout_prob=0.0,
                     hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions per median (default 10, 5 with --quick; the small encoder takes 10x)")
    ap.add_argument("--quick", action="store_true", help="first shape only, 5 repetitions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--keep-heap", action="store_true", help=KEEP_HEAP_HELP)
    args = ap.parse_args(argv)
    heap = "kept (--keep-heap)" if args.keep_heap and keep_heap() else "glibc defaults"
    mmhf.register()
    base_reps = args.reps if args.reps is not None else 5 if args.quick else 10
    rows = []
    for name, hidden, heads, layers, B, L, pad, factor in SHAPES[:1] if args.quick else SHAPES:
        reps = base_reps * factor
        model = make_model(hidden, heads, layers, args.device).eval()
        use = {impl: (lambda impl=impl: model.set_attn_implementation(impl)) for impl in IMPLS}
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 1000, (B, L), generator=g).to(args.device)
        lengths = (L * (1 - pad * torch.rand(B, generator=g))).long().clamp(min=1)
        mask = (torch.arange(L)[None, :] < lengths[:, None]).long().to(args.device)

        def fwd(m):
            with torch.no_grad():
                return m(input_ids=ids, attention_mask=mask).last_hidden_state

        def fwd_bwd(m):
            m.zero_grad(set_to_none=True)
            m(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean().backward()

        t_f = interleaved_median_ms({k: (lambda: fwd(model)) for k in IMPLS}, reps=reps, device=args.device,
                                    before=use)
        t_fb = interleaved_median_ms({k: (lambda: fwd_bwd(model)) for k in IMPLS}, reps=reps, device=args.device,
                                     before=use)
        use["mmkernels"]()
        mmhf.reset_stats()
        fwd(model)
        served = mmhf.stats()
        assert served == {"mmkernels": layers}, served  # every layer ran on the op, none fell back
        for impl in IMPLS:
            rows.append({"shape": f"{name}: B{B} L{L} pad<={int(pad * 100)}% h{hidden}/{heads} x{layers}",
                         "attn_implementation": impl, "reps": reps, "fwd_ms": t_f[impl], "fwd_bwd_ms": t_fb[impl],
                         "fwd_speedup_vs_sdpa": t_f["sdpa"] / t_f[impl],
                         "fwd_bwd_speedup_vs_sdpa": t_fb["sdpa"] / t_fb[impl]})
    cols = ["shape", "attn_implementation", "reps", "fwd_ms", "fwd_bwd_ms", "fwd_speedup_vs_sdpa",
            "fwd_bwd_speedup_vs_sdpa"]
    notes = [f"device {args.device}, fp32, medians of the repetitions shown, round-robin, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}",
             "whole encoder (embeddings, attention, MLP); padding lengths drawn uniformly up to the fraction shown",
             f"heap: {heap}"]
    md = write_report("transformers_bert", rows, cols, "BERT encoder: attn_implementation", notes)
    bar_plot("transformers_bert", [f"{r['shape'][:18]} {r['attn_implementation']}" for r in rows],
             [r["fwd_bwd_ms"] for r in rows], "forward+backward ms", "BERT encoder by attn_implementation")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
