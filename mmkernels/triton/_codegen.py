"""Regenerate cross_modal_attention_kernels.py from its template cross_modal_attention_kernels.py.in.

The kernels take up to 8 KV segments as separate pointer/stride/length slots and
walk them with constexpr-guarded blocks (`if NUM_SEG > m:`); those repetitive
parts (the #SEG_PARAMS#, #SEG_LENS#, #FWD_CALLS# and #DQ_CALLS# placeholders of the
template) are written out by this script rather than by hand. Only the device code
is generated: the host side, cross_modal_attention.py, is written by hand.

    python -m mmkernels.triton._codegen          # rewrite cross_modal_attention_kernels.py
    python -m mmkernels.triton._codegen --check  # exit 1 if cross_modal_attention_kernels.py is stale

The `-m` form imports the package, hence the generated module; where that module is
missing, run the file itself: `python mmkernels/triton/_codegen.py` (it imports nothing of mmkernels).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
S = 8  # MAX_SEGMENTS
def seg_params(indent="    "):
    return "".join(f"{indent}K{m}, V{m}, sk{m}b, sk{m}n, sk{m}h, sv{m}b, sv{m}n, sv{m}h, LK{m}, KM{m}, skm{m}b,\n"
                   for m in range(S))
def seg_lens(indent="    "):
    out = []
    for m in range(S):
        out.append(f"{indent}kvl{m} = _seg_valid(KVLEN, skvb, skvm, b, {m}, LK{m}, NUM_SEG, HAS_KVLEN) * active")
    out.append(indent + "off0 = 0")
    for m in range(1, S):
        out.append(f"{indent}off{m} = off{m-1} + kvl{m-1}")
    out.append(f"{indent}total = off7 + kvl7")
    return "\n".join(out) + "\n"
def fwd_calls(indent="    "):
    out = []
    for m in range(S):
        out.append(f"""{indent}if NUM_SEG > {m}:
{indent}    lo = tl.minimum(tl.maximum(s_lo - off{m}, 0), kvl{m})
{indent}    hi = tl.minimum(tl.maximum(s_hi - off{m}, 0), kvl{m})
{indent}    if CAUSAL:
{indent}        hi = tl.minimum(hi, causal_hi)
{indent}    brow = _bias_row(BIAS, sbh, sbm, h, {m}, row_in, HAS_BIAS)
{indent}    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K{m}, V{m}, sk{m}b, sk{m}n, sk{m}h, sv{m}b, sv{m}n, sv{m}h,
{indent}                                 KM{m} + b * skm{m}b, b, hkv, lo, hi, brow, i_row, causal_off, qk_scale,
{indent}                                 offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, IEEE,
{indent}                                 HAS_BIAS, HAS_MASK)""")
    return "\n".join(out) + "\n"
def dq_calls(indent="    "):
    out = []
    for m in range(S):
        out.append(f"""{indent}if NUM_SEG > {m}:
{indent}    hi = kvl{m}
{indent}    if CAUSAL:
{indent}        hi = tl.minimum(hi, causal_hi)
{indent}    brow = _bias_row(BIAS, sbh, sbm, h, {m}, row_in, HAS_BIAS)
{indent}    dq, dbr = _dq_segment(dq, q, do, t_row, L2, dlt, K{m}, V{m}, sk{m}b, sk{m}n, sk{m}h, sv{m}b, sv{m}n, sv{m}h,
{indent}                          KM{m} + b * skm{m}b, b, hkv, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d,
{indent}                          offs_dv, D, DV, BLOCK_N, CAUSAL, IEEE, HAS_MASK)
{indent}    if HAS_BIAS:
{indent}        tl.store(DBIAS + dbias_base + {m}, dbr, mask=row_in)""")
    return "\n".join(out) + "\n"


TEMPLATE = HERE / "cross_modal_attention_kernels.py.in"
TARGET = HERE / "cross_modal_attention_kernels.py"


def render() -> str:
    src = TEMPLATE.read_text()
    header = f"# GENERATED from {TEMPLATE.name} by `python -m mmkernels.triton._codegen`: edit the template.\n"
    return header + (src.replace("#SEG_PARAMS#\n", seg_params()).replace("#SEG_LENS#\n", seg_lens())
                     .replace("#FWD_CALLS#\n", fwd_calls()).replace("#DQ_CALLS#\n", dq_calls()))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = render()
    if "--check" in argv:
        ok = TARGET.exists() and TARGET.read_text() == out
        print(f"{TARGET.name} is up to date" if ok else f"{TARGET.name} is stale: run python -m mmkernels.triton._codegen")
        return 0 if ok else 1
    TARGET.write_text(out)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
