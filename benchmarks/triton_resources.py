"""Resource usage of every Triton autotune config on sm_90, without a GPU.

Compiles each kernel of mmkernels/triton with each of its autotune configs for
the H200 targets' shapes (bf16, head dim 128, three KV segments with lengths,
no bias/gate unless asked) and prints registers, spills, shared memory and the
matrix instructions in SASS (HGMMA = Hopper wgmma, HMMA = the older mma).
A config over the shared-memory limit cannot launch; one that spills is slow.

    python benchmarks/triton_resources.py [--head-dim 128] [--bias-gate] [--csv FILE]
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, if not pip-installed

import triton  # noqa: E402

import mmkernels.triton.cross_modal_attention_kernels as A  # noqa: E402
import mmkernels.triton.gated_fusion as GF  # noqa: E402
from mmkernels.triton._aot import SM90_MAX_SHARED, compile_sm90, resource_usage  # noqa: E402

ATTN_PTRS = {"*": "*bf16", "KVLEN": "*i32", "QLEN": "*i64", "KM": "*u8", **{f"KM{m}": "*u8" for m in range(8)},
             **{n: "*fp32" for n in ["BIAS", "GATE_T", "LSE", "OPART", "LPART", "DLT", "DBIAS", "RD"]}}
GF_PTRS = {"*": "*bf16", "P": "*u8"}


def cases(head_dim: int, bias_gate: bool):
    """(name, kernel, constexprs, pointer types, float args, configs)."""
    flags = dict(NUM_SEG=3, HAS_KVLEN=True, HAS_QLEN=True, HAS_BIAS=bias_gate, HAS_GATE=bias_gate,
                 CAUSAL=False, IEEE=False, HAS_MASK=False)
    dims = dict(D=head_dim, DV=head_dim, BLOCK_D=head_dim, BLOCK_DV=head_dim)
    yield "attn fwd", A._cross_modal_attention_fwd_kernel, dict(dims, SPLIT=False, **flags), ATTN_PTRS, ("qk_scale",), A._FWD_CONFIGS
    yield "attn fwd split-KV", A._cross_modal_attention_fwd_kernel, dict(dims, SPLIT=True, **flags), ATTN_PTRS, ("qk_scale",), \
        A._FWD_CONFIGS
    yield "attn bwd dq", A._cross_modal_attention_bwd_dq_kernel, dict(dims, **flags), ATTN_PTRS, ("qk_scale", "scale"), A._DQ_CONFIGS
    yield "attn bwd dk/dv", A._cross_modal_attention_bwd_dkdv_kernel, dict(dims, **flags), ATTN_PTRS, ("qk_scale", "scale"), \
        A._DKDV_CONFIGS
    for name, kernel, extra in (("gated fusion fwd", GF._gf_fwd_kernel, dict(RET_G=False)),
                                ("gated fusion bwd", GF._gf_bwd_kernel, dict(HAS_GG=False))):
        yield name, kernel, dict(M=3, MP2=4, HAS_P=True, ACT=0, **extra), GF_PTRS, (), GF._CONFIGS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--bias-gate", action="store_true", help="compile with modality_bias and head_gate")
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = ap.parse_args(argv)

    print(f"triton {triton.__version__}, target sm_90, bf16, head dim {args.head_dim}, "
          f"shared-memory limit {SM90_MAX_SHARED // 1024} KiB per program")
    head = f"{'kernel':<18} {'config':<30} {'regs':>5} {'spill B':>8} {'smem KiB':>9} {'HGMMA':>6} {'HMMA':>5} " \
           f"{'fits':>5} {'s':>5}"
    print(head)
    print("-" * len(head))
    rows, bad_defaults = [], []
    for name, kernel, consts, ptrs, floats, configs in cases(args.head_dim, args.bias_gate):
        for i, cfg in enumerate(configs):
            label = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" w{cfg.num_warps} s{cfg.num_stages}"
            t0 = time.time()
            try:
                u = resource_usage(compile_sm90(kernel, {**consts, **cfg.kwargs}, ptrs, floats,
                                                num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            except Exception as e:  # noqa: BLE001  (a config that does not compile is a finding)
                u = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
            spill = u.get("stack", 0) + u.get("local", 0)
            fits = "error" not in u and u["shared"] <= SM90_MAX_SHARED and spill == 0
            if i == 0 and not fits:
                bad_defaults.append(name)
            row = dict(kernel=name, config=label, default=i == 0, fits=fits, seconds=round(time.time() - t0, 1), **u)
            rows.append(row)
            if "error" in u:
                print(f"{name:<18} {label:<30} {u['error']}")
                continue
            print(f"{name:<18} {label:<30} {u.get('reg', '?'):>5} {spill:>8} {u['shared'] / 1024:>9.0f} "
                  f"{u.get('hgmma', '?'):>6} {u.get('hmma', '?'):>5} {'yes' if fits else 'NO':>5} "
                  f"{row['seconds']:>5}", flush=True)
    if args.csv:
        keys = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    if bad_defaults:
        print("default (no-autotune) config does not fit for:", ", ".join(bad_defaults))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
