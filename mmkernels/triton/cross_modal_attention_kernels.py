# GENERATED from cross_modal_attention_kernels.py.in by `python -m mmkernels.triton._codegen`: edit the template.
"""Triton device code of cross-modal attention: forward (with a split-KV path) and backward kernels.

The template of cross_modal_attention_kernels.py (`python -m mmkernels.triton._codegen`
writes out the 8 KV-segment slots where the #...# placeholders stand): the
@triton.jit kernels and helpers, their autotune configs and constants. The launch
code, the split-KV settings and the `triton_op` definitions are in
cross_modal_attention.py. This module imports only triton and the standard library.

Layout of the work (FlashAttention-2 with the contract of DESIGN.md 2.1):

* One program owns a tile of BLOCK_M *rows* of one (sample, kv head): row r is
  query i = r // G of query head h = hkv * G + r % G (G = Hq // Hkv), so the
  query heads of a GQA/MQA group share every K/V load.
* The M <= 8 KV segments arrive as 8 pointer slots with their own strides and
  lengths; one launch walks them in turn with one online softmax (no
  concatenation). Each segment's loop stops at min(kv_lengths[b, m], Lk_m),
  read on device: blocks past the valid length are never visited.
* Split-KV (flash-decoding) for short queries over long keys: the valid keys of
  a sample (all segments together) are cut into `num_splits` chunks, each
  program writes a normalised partial output and its lse, and a merge kernel
  combines them by lse.
* Backward: a preprocess kernel (rowdot = sum(dO * O_ungated)), a dQ kernel
  over row tiles (one launch over all segments; it also writes per-row partial
  sums of dS per segment for the modality_bias grad), and a dK/dV kernel over
  key blocks, one launch per segment (a row tile covers all query heads of the
  kv head, so dK/dV of a GQA group needs no cross-program reduction). The bias
  and gate grads are reduced with torch afterwards: deterministic, no atomics.

Why the 8 segment slots are generated (_codegen.py) rather than passed as tuples
indexed inside `tl.static_range`: with triton 3.8 here, tuple arguments of
tensors work under `triton_op` + `wrap_triton` in eager (the interpreter) and
compile for sm_90 ahead of time, but torch.compile(fullgraph=True) of a Triton op
cannot be run without a GPU (the interpreter fails it for every op), so whether
inductor's user-kernel path takes tuple arguments on triton 3.6 (the H200
image) is unchecked. The switch waits for a GPU run that checks it.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SEGMENTS = 8
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# MMKERNELS_TRITON_AUTOTUNE=0 (read at import) keeps only the first config of each
# list: no autotuning, one compilation per kernel variant (quick test runs on a GPU).
AUTOTUNE = os.environ.get("MMKERNELS_TRITON_AUTOTUNE", "1") != "0"


def _prune(configs, named_args, **kwargs):
    """The configs worth timing for these arguments: tiles no taller than the query rows
    (the rest of a taller tile is padding), and for fp32 (exact IEEE dots) or head dims
    over 128 only the small tiles (the big ones spill registers and take ptxas minutes)."""
    args = dict(named_args, **kwargs)
    rows = max(int(args.get("lq_bucket", 256)), min(c.kwargs["BLOCK_M"] for c in configs))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= rows]
    small = bool(args.get("IEEE", False)) or max(args.get("BLOCK_D", 0), args.get("BLOCK_DV", 0)) > 128
    if small:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or kept[:1]
    return kept


def _tuned(configs, key):
    """Autotune on the GPU; under the interpreter the launch passes fixed blocks."""
    def wrap(kernel):
        if INTERPRET:
            return kernel
        if not AUTOTUNE:
            return triton.autotune(configs=configs[:1], key=key)(kernel)
        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune})(kernel)
    return wrap


def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


# Hopper (H100/H200) oriented choices; the autotuner drops configs that do not fit.
# The first entry of each list is the no-autotune default (see AUTOTUNE).
# At head dim 128 in bf16 without bias and gate none of them spills registers or
# overflows shared memory (python benchmarks/triton_resources.py; a test checks the defaults).
_FWD_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(64, 64, 8, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3),
                _cfg(64, 128, 8, 3)]
_DKDV_CONFIGS = [_cfg(64, 64, 8, 2), _cfg(32, 128, 8, 3), _cfg(32, 64, 8, 3)]
_DQ_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(64, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 128, 8, 2)]
# lq_bucket (rows of a (sample, kv head) rounded up to a power of two, at most 256)
# keeps short-query calls from reusing the tiles tuned for long ones, without a
# retune for every query length.
_KEY = ["D", "DV", "NUM_SEG", "CAUSAL", "HAS_BIAS", "IEEE", "lq_bucket"]


# ------------------------------------------------------------------ helpers (device)
# Triton 3.8's interpreter computes tl.dot on bf16 operands wrongly (it multiplies
# the raw bits): there, bf16 operands are widened to fp32 first (exact products).
_INTERP_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if _INTERP_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _seg_valid(KVLEN, skvb, skvm, b, m: tl.constexpr, LK, NUM_SEG: tl.constexpr, HAS_KVLEN: tl.constexpr):
    """Valid keys of segment m in sample b: min(max(kv_lengths[b, m], 0), Lk_m); 0 past NUM_SEG."""
    if m >= NUM_SEG:
        n = 0
    elif HAS_KVLEN:
        n = tl.load(KVLEN + b * skvb + m * skvm).to(tl.int32)
        n = tl.minimum(tl.maximum(n, 0), LK)
    else:
        n = LK
    return n


@triton.jit
def _bias_row(BIAS, sbh, sbm, h, m, row_in, HAS_BIAS: tl.constexpr):
    """modality_bias[h, m] per row, in the log2 domain (0 without bias)."""
    if HAS_BIAS:
        br = tl.load(BIAS + h * sbh + m * sbm, mask=row_in, other=0.0).to(tl.float32) * 1.4426950408889634
    else:
        br = h.to(tl.float32) * 0.0
    return br


@triton.jit
def _key_mask(km_base, n, hi, HAS_MASK: tl.constexpr):
    """kv_masks of keys n (< hi) as booleans, and whether any of them is set (all True without masks)."""
    if HAS_MASK:
        keep = tl.load(km_base + n, mask=n < hi, other=0) != 0
        live = tl.max(keep.to(tl.int32), 0) > 0
    else:
        keep = n >= 0
        live = True
    return keep, live


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, km_base, start, hi, brow, i_row, causal_off, qk_scale,
               offs_n, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    """One key block of the online softmax; MASKED for the tail block, causal and key masks.
    A block whose keys are all masked out is skipped."""
    n = start + offs_n
    keep, live = _key_mask(km_base, n, hi, HAS_MASK)
    if live:
        acc, m_i, l_i = _fwd_block_math(acc, m_i, l_i, q, k_base, v_base, skn, svn, n, keep, hi, brow, i_row,
                                        causal_off, qk_scale, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, CAUSAL,
                                        MASKED, IEEE, HAS_BIAS, HAS_MASK)
    return acc, m_i, l_i


@triton.jit
def _fwd_block_math(acc, m_i, l_i, q, k_base, v_base, skn, svn, n, keep, hi, brow, i_row, causal_off, qk_scale,
                    offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    n64 = n.to(tl.int64)
    kptr = k_base + n64[None, :] * skn + offs_d[:, None]
    vptr = v_base + n64[:, None] * svn + offs_dv[None, :]
    if MASKED:
        nmask = n < hi
        kt = tl.load(kptr, mask=nmask[None, :] & (offs_d[:, None] < D), other=0.0)
        v = tl.load(vptr, mask=nmask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    else:
        if BLOCK_D == D:
            kt = tl.load(kptr)
        else:
            kt = tl.load(kptr, mask=offs_d[:, None] < D, other=0.0)
        if BLOCK_DV == DV:
            v = tl.load(vptr)
        else:
            v = tl.load(vptr, mask=offs_dv[None, :] < DV, other=0.0)
    s = _dot(q, kt, IEEE) * qk_scale
    if HAS_BIAS:
        s = s + brow[:, None]
    if MASKED:
        valid = nmask[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= i_row[:, None] + causal_off)
        if HAS_MASK:
            valid = valid & keep[None, :]
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _fwd_segment(acc, m_i, l_i, q, K, V, skb, skn, skh, svb, svn, svh, km_base,
                 b, hkv, lo, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d, offs_dv,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_MASK: tl.constexpr):
    k_base = K + b * skb + hkv.to(tl.int64) * skh
    v_base = V + b * svb + hkv.to(tl.int64) * svh
    hi = tl.maximum(hi, lo)
    if CAUSAL or HAS_MASK:  # every block masked
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, km_base, start, hi, brow, i_row,
                                       causal_off, qk_scale, offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV,
                                       CAUSAL, True, IEEE, HAS_BIAS, HAS_MASK)
    else:
        # full blocks without masks, then the tail block masked
        n_full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
        for start in range(lo, n_full, BLOCK_N):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, km_base, start, hi, brow, i_row,
                                       causal_off, qk_scale, offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV,
                                       CAUSAL, False, IEEE, HAS_BIAS, HAS_MASK)
        if n_full < hi:
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, km_base, n_full, hi, brow,
                                       i_row, causal_off, qk_scale, offs_n, offs_d, offs_dv, D, DV, BLOCK_D,
                                       BLOCK_DV, CAUSAL, True, IEEE, HAS_BIAS, HAS_MASK)
    return acc, m_i, l_i


@triton.jit
def _store_out(OUT, OUTU, sob, som, soh, LSE, GATE_T, b, i_row, h, Lq, Hq, o, lse2, row_in, offs_dv,
               DV: tl.constexpr, HAS_GATE: tl.constexpr):
    optr = b * sob + i_row.to(tl.int64)[:, None] * som + h.to(tl.int64)[:, None] * soh + offs_dv[None, :]
    omask = row_in[:, None] & (offs_dv[None, :] < DV)
    if HAS_GATE:
        t = tl.load(GATE_T + h, mask=row_in, other=0.0)
        tl.store(OUTU + optr, o.to(OUTU.dtype.element_ty), mask=omask)
        o = o * t[:, None]
    tl.store(OUT + optr, o.to(OUT.dtype.element_ty), mask=omask)
    tl.store(LSE + (b * Hq + h) * Lq + i_row, lse2 * 0.6931471805599453, mask=row_in)


# ------------------------------------------------------------------ forward
@_tuned(_FWD_CONFIGS, _KEY + ["SPLIT"])
@triton.jit
def _cross_modal_attention_fwd_kernel(
    Q, sqb, sqm, sqh,
    K0, V0, sk0b, sk0n, sk0h, sv0b, sv0n, sv0h, LK0, KM0, skm0b,
    K1, V1, sk1b, sk1n, sk1h, sv1b, sv1n, sv1h, LK1, KM1, skm1b,
    K2, V2, sk2b, sk2n, sk2h, sv2b, sv2n, sv2h, LK2, KM2, skm2b,
    K3, V3, sk3b, sk3n, sk3h, sv3b, sv3n, sv3h, LK3, KM3, skm3b,
    K4, V4, sk4b, sk4n, sk4h, sv4b, sv4n, sv4h, LK4, KM4, skm4b,
    K5, V5, sk5b, sk5n, sk5h, sv5b, sv5n, sv5h, LK5, KM5, skm5b,
    K6, V6, sk6b, sk6n, sk6h, sv6b, sv6n, sv6h, LK6, KM6, skm6b,
    K7, V7, sk7b, sk7n, sk7h, sv7b, sv7n, sv7h, LK7, KM7, skm7b,
    KVLEN, skvb, skvm, QLEN, BIAS, sbh, sbm, GATE_T,
    OUT, OUTU, sob, som, soh, LSE, OPART, LPART,
    Lq, G, Hkv, num_splits, qk_scale, lq_bucket,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NUM_SEG: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // Hkv).to(tl.int64)
    hkv = bh % Hkv  # int32; every offset built from it is int64 (a (B, H, L, D) view passes 2**31)
    Hq = Hkv * G
    LqG = Lq * G
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = r < LqG
    i_row = r // G
    h = hkv * G + r % G
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if HAS_QLEN:
        q_len = tl.minimum(tl.maximum(tl.load(QLEN + b).to(tl.int32), 0), Lq)
    else:
        q_len = Lq
    # a tile whose first query is padding skips every key block
    active = ((pid_m * BLOCK_M) // G < q_len).to(tl.int32)
    kvl0 = _seg_valid(KVLEN, skvb, skvm, b, 0, LK0, NUM_SEG, HAS_KVLEN) * active
    kvl1 = _seg_valid(KVLEN, skvb, skvm, b, 1, LK1, NUM_SEG, HAS_KVLEN) * active
    kvl2 = _seg_valid(KVLEN, skvb, skvm, b, 2, LK2, NUM_SEG, HAS_KVLEN) * active
    kvl3 = _seg_valid(KVLEN, skvb, skvm, b, 3, LK3, NUM_SEG, HAS_KVLEN) * active
    kvl4 = _seg_valid(KVLEN, skvb, skvm, b, 4, LK4, NUM_SEG, HAS_KVLEN) * active
    kvl5 = _seg_valid(KVLEN, skvb, skvm, b, 5, LK5, NUM_SEG, HAS_KVLEN) * active
    kvl6 = _seg_valid(KVLEN, skvb, skvm, b, 6, LK6, NUM_SEG, HAS_KVLEN) * active
    kvl7 = _seg_valid(KVLEN, skvb, skvm, b, 7, LK7, NUM_SEG, HAS_KVLEN) * active
    off0 = 0
    off1 = off0 + kvl0
    off2 = off1 + kvl1
    off3 = off2 + kvl2
    off4 = off3 + kvl3
    off5 = off4 + kvl4
    off6 = off5 + kvl5
    off7 = off6 + kvl6
    total = off7 + kvl7
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
        s_lo = split * chunk
        s_hi = tl.minimum(s_lo + chunk, total)
    else:
        s_lo = 0
        s_hi = total
    # causal (M == 1): query i sees key j iff j <= i + kv_len - q_len
    causal_off = kvl0 - q_len
    causal_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, q_len - 1) + causal_off + 1
    q = tl.load(Q + b * sqb + i_row.to(tl.int64)[:, None] * sqm + h.to(tl.int64)[:, None] * sqh + offs_d[None, :],
                mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if NUM_SEG > 0:
        lo = tl.minimum(tl.maximum(s_lo - off0, 0), kvl0)
        hi = tl.minimum(tl.maximum(s_hi - off0, 0), kvl0)
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 0, row_in, HAS_BIAS)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K0, V0, sk0b, sk0n, sk0h, sv0b, sv0n, sv0h,
                                     KM0 + b * skm0b, b, hkv, lo, hi, brow, i_row, causal_off, qk_scale,
                                     offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, IEEE,
                                     HAS_BIAS, HAS_MASK)
    if NUM_SEG > 1:
        lo = tl.minimum(tl.maximum(s_lo - off1, 0), kvl1)
        hi = tl.minimum(tl.maximum(s_hi - off1, 0), kvl1)
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 1, row_in, HAS_BIAS)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K1, V1, sk1b, sk1n, sk1h, sv1b, sv1n, sv1h,
                                     KM1 + b * skm1b, b, hkv, lo, hi, brow, i_row, causal_off, qk_scale,
                                     offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, IEEE,
                                     HAS_BIAS, HAS_MASK)
    if NUM_SEG > 2:
        lo = tl.minimum(tl.maximum(s_lo - off2, 0), kvl2)
        hi = tl.minimum(tl.maximum(s_hi - off2, 0), kvl2)
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 2, row_in, HAS_BIAS)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K2, V2, sk2b, sk2n, sk2h, sv2b, sv2n, sv2h,
                                     KM2 + b * skm2b, b, hkv, lo, hi, brow, i_row, causal_off, qk_scale,
                                     offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, IEEE,
                                     HAS_BIAS, HAS_MASK)
    if NUM_SEG > 3:
        lo = tl.minimum(tl.maximum(s_lo - off3, 0), kvl3)
        hi = tl.minimum(tl.maximum(s_hi - off3, 0), kvl3)
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 3, row_in, HAS_BIAS)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K3, V3, sk3b, sk3n, sk3h, sv3b, sv3n, sv3h,
                                     KM3 + b * skm3b, b, hkv, lo, hi, brow, i_row, causal_off, qk_scale,
                                     offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, IEEE,
                                     HAS_BIAS, HAS_MASK)
    if NUM_SEG > 4:
        lo = tl.minimum(tl.maximum(s_lo - off4, 0), kvl4)
        hi = tl.minimum(tl.maximum(s_hi - off4, 0), kvl4)
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 4, row_in, HAS_BIAS)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K4, V4, sk4b, sk4n, sk4h, sv4b, sv4n, sv4h,
                                     KM4 + b * skm4b, b, hkv, lo, hi, brow, i_row, causal_off, qk_scale,
                                     offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, IEEE,
                                     HAS_BIAS, HAS_MASK)
    if NUM_SEG > 5:
        lo = tl.minimum(tl.maximum(s_lo - off5, 0), kvl5)
        hi = tl.minimum(tl.maximum(s_hi - off5, 0), kvl5)
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 5, row_in, HAS_BIAS)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K5, V5, sk5b, sk5n, sk5h, sv5b, sv5n, sv5h,
                                     KM5 + b * skm5b, b, hkv, lo, hi, brow, i_row, causal_off, qk_scale,
                                     offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, IEEE,
                                     HAS_BIAS, HAS_MASK)
    if NUM_SEG > 6:
        lo = tl.minimum(tl.maximum(s_lo - off6, 0), kvl6)
        hi = tl.minimum(tl.maximum(s_hi - off6, 0), kvl6)
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 6, row_in, HAS_BIAS)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K6, V6, sk6b, sk6n, sk6h, sv6b, sv6n, sv6h,
                                     KM6 + b * skm6b, b, hkv, lo, hi, brow, i_row, causal_off, qk_scale,
                                     offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, IEEE,
                                     HAS_BIAS, HAS_MASK)
    if NUM_SEG > 7:
        lo = tl.minimum(tl.maximum(s_lo - off7, 0), kvl7)
        hi = tl.minimum(tl.maximum(s_hi - off7, 0), kvl7)
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 7, row_in, HAS_BIAS)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K7, V7, sk7b, sk7n, sk7h, sv7b, sv7n, sv7h,
                                     KM7 + b * skm7b, b, hkv, lo, hi, brow, i_row, causal_off, qk_scale,
                                     offs_n, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, IEEE,
                                     HAS_BIAS, HAS_MASK)
    row_ok = row_in & (i_row < q_len) & (l_i > 0)
    l_safe = tl.where(row_ok, l_i, 1.0)
    o = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    lse2 = tl.where(row_ok, m_i + tl.log2(l_safe), float("-inf"))
    if SPLIT:
        pbase = (bh.to(tl.int64) * num_splits + split) * LqG + r
        tl.store(LPART + pbase, lse2, mask=row_in)
        tl.store(OPART + pbase[:, None] * DV + offs_dv[None, :], o,
                 mask=row_in[:, None] & (offs_dv[None, :] < DV))
    else:
        _store_out(OUT, OUTU, sob, som, soh, LSE, GATE_T, b, i_row, h, Lq, Hq, o, lse2, row_in, offs_dv,
                   DV, HAS_GATE)


@triton.jit
def _cross_modal_attention_merge_kernel(OPART, LPART, OUT, OUTU, sob, som, soh, LSE, GATE_T, Lq, G, Hkv, num_splits,
                      DV: tl.constexpr, BLOCK_DV: tl.constexpr, NS_P2: tl.constexpr, HAS_GATE: tl.constexpr):
    """Merge the split-KV partials of one row by their lse (log2 domain)."""
    r = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hkv = bh % Hkv
    Hq = Hkv * G
    LqG = Lq * G
    s = tl.arange(0, NS_P2)
    smask = s < num_splits
    offs_dv = tl.arange(0, BLOCK_DV)
    pbase = (bh.to(tl.int64) * num_splits + s) * LqG + r
    lp = tl.load(LPART + pbase, mask=smask, other=float("-inf"))
    mx = tl.max(lp, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lp - mx_safe)
    wsum = tl.sum(w, 0)
    op = tl.load(OPART + pbase[:, None] * DV + offs_dv[None, :],
                 mask=smask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    o = tl.sum(w[:, None] * op, 0) / tl.where(wsum > 0, wsum, 1.0)
    lse2 = tl.where(wsum > 0, mx_safe + tl.log2(tl.where(wsum > 0, wsum, 1.0)), float("-inf"))
    i = r // G
    h = hkv * G + r % G
    optr = b * sob + i * som + h * soh + offs_dv
    dmask = offs_dv < DV
    if HAS_GATE:
        t = tl.load(GATE_T + h)
        tl.store(OUTU + optr, o.to(OUTU.dtype.element_ty), mask=dmask)
        o = o * t
    tl.store(OUT + optr, o.to(OUT.dtype.element_ty), mask=dmask)
    tl.store(LSE + (b * Hq + h) * Lq + i, lse2 * 0.6931471805599453)


# ------------------------------------------------------------------ backward
@triton.jit
def _cross_modal_attention_bwd_pre_kernel(DO, sdb, sdm, sdh, O, sob, som, soh, RD, Lq, Hq, n_rows,
                        DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr):
    """rowdot[b, h, i] = sum_d dO[b, i, h, d] * O_ungated[b, i, h, d] (fp32)."""
    rr = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rr < n_rows
    b = rr // (Lq * Hq)
    rem = rr % (Lq * Hq)
    i = rem // Hq
    h = rem % Hq
    offs = tl.arange(0, BLOCK_DV)
    mask = rmask[:, None] & (offs[None, :] < DV)
    do = tl.load(DO + (b * sdb + i * sdm + h * sdh)[:, None] + offs[None, :], mask=mask, other=0.0)
    o = tl.load(O + (b * sob + i * som + h * soh)[:, None] + offs[None, :], mask=mask, other=0.0)
    rd = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(RD + (b * Hq + h) * Lq + i, rd, mask=rmask)


@triton.jit
def _dq_segment(dq, q, do, t_row, L2, dlt, K, V, skb, skn, skh, svb, svn, svh, km_base,
                b, hkv, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d, offs_dv,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                IEEE: tl.constexpr, HAS_MASK: tl.constexpr):
    dbr = tl.zeros_like(dlt)
    for start in range(0, hi, BLOCK_N):
        n = start + offs_n
        keep, live = _key_mask(km_base, n, hi, HAS_MASK)
        if live:  # a block whose keys are all masked out is skipped
            dq, dbr = _dq_block(dq, dbr, q, do, t_row, L2, dlt, K, V, skb, skn, skh, svb, svn, svh, b, hkv, n, keep,
                                hi, brow, i_row, causal_off, qk_scale, offs_d, offs_dv, D, DV, CAUSAL, IEEE, HAS_MASK)
    return dq, dbr


@triton.jit
def _dq_block(dq, dbr, q, do, t_row, L2, dlt, K, V, skb, skn, skh, svb, svn, svh, b, hkv, n, keep,
              hi, brow, i_row, causal_off, qk_scale, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr,
              CAUSAL: tl.constexpr, IEEE: tl.constexpr, HAS_MASK: tl.constexpr):
    k_base = K + b * skb + hkv.to(tl.int64) * skh
    v_base = V + b * svb + hkv.to(tl.int64) * svh
    nmask = n < hi
    n64 = n.to(tl.int64)
    k = tl.load(k_base + n64[:, None] * skn + offs_d[None, :],
                mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_base + n64[:, None] * svn + offs_dv[None, :],
                mask=nmask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale + brow[:, None]
    valid = nmask[None, :]
    if CAUSAL:
        valid = valid & (n[None, :] <= i_row[:, None] + causal_off)
    if HAS_MASK:
        valid = valid & keep[None, :]
    p = tl.where(valid, tl.exp2(s - L2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), IEEE) * t_row[:, None]
    ds = p * (dp - dlt[:, None])
    dq += _dot(ds.to(k.dtype), k, IEEE)
    dbr += tl.sum(ds, 1)
    return dq, dbr


@_tuned(_DQ_CONFIGS, _KEY)
@triton.jit
def _cross_modal_attention_bwd_dq_kernel(
    Q, sqb, sqm, sqh, DO, sdb, sdm, sdh,
    K0, V0, sk0b, sk0n, sk0h, sv0b, sv0n, sv0h, LK0, KM0, skm0b,
    K1, V1, sk1b, sk1n, sk1h, sv1b, sv1n, sv1h, LK1, KM1, skm1b,
    K2, V2, sk2b, sk2n, sk2h, sv2b, sv2n, sv2h, LK2, KM2, skm2b,
    K3, V3, sk3b, sk3n, sk3h, sv3b, sv3n, sv3h, LK3, KM3, skm3b,
    K4, V4, sk4b, sk4n, sk4h, sv4b, sv4n, sv4h, LK4, KM4, skm4b,
    K5, V5, sk5b, sk5n, sk5h, sv5b, sv5n, sv5h, LK5, KM5, skm5b,
    K6, V6, sk6b, sk6n, sk6h, sv6b, sv6n, sv6h, LK6, KM6, skm6b,
    K7, V7, sk7b, sk7n, sk7h, sv7b, sv7n, sv7h, LK7, KM7, skm7b,
    KVLEN, skvb, skvm, QLEN, BIAS, sbh, sbm, GATE_T, LSE, DLT,
    DQ, sdqb, sdqm, sdqh, DBIAS,
    Lq, G, Hkv, qk_scale, scale, lq_bucket,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NUM_SEG: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hkv = bh % Hkv
    Hq = Hkv * G
    LqG = Lq * G
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = r < LqG
    i_row = r // G
    h = hkv * G + r % G
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if HAS_QLEN:
        q_len = tl.minimum(tl.maximum(tl.load(QLEN + b).to(tl.int32), 0), Lq)
    else:
        q_len = Lq
    active = ((pid_m * BLOCK_M) // G < q_len).to(tl.int32)
    kvl0 = _seg_valid(KVLEN, skvb, skvm, b, 0, LK0, NUM_SEG, HAS_KVLEN) * active
    kvl1 = _seg_valid(KVLEN, skvb, skvm, b, 1, LK1, NUM_SEG, HAS_KVLEN) * active
    kvl2 = _seg_valid(KVLEN, skvb, skvm, b, 2, LK2, NUM_SEG, HAS_KVLEN) * active
    kvl3 = _seg_valid(KVLEN, skvb, skvm, b, 3, LK3, NUM_SEG, HAS_KVLEN) * active
    kvl4 = _seg_valid(KVLEN, skvb, skvm, b, 4, LK4, NUM_SEG, HAS_KVLEN) * active
    kvl5 = _seg_valid(KVLEN, skvb, skvm, b, 5, LK5, NUM_SEG, HAS_KVLEN) * active
    kvl6 = _seg_valid(KVLEN, skvb, skvm, b, 6, LK6, NUM_SEG, HAS_KVLEN) * active
    kvl7 = _seg_valid(KVLEN, skvb, skvm, b, 7, LK7, NUM_SEG, HAS_KVLEN) * active
    off0 = 0
    off1 = off0 + kvl0
    off2 = off1 + kvl1
    off3 = off2 + kvl2
    off4 = off3 + kvl3
    off5 = off4 + kvl4
    off6 = off5 + kvl5
    off7 = off6 + kvl6
    total = off7 + kvl7
    causal_off = kvl0 - q_len
    causal_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, q_len - 1) + causal_off + 1
    q = tl.load(Q + b * sqb + i_row.to(tl.int64)[:, None] * sqm + h.to(tl.int64)[:, None] * sqh + offs_d[None, :],
                mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdb + i_row.to(tl.int64)[:, None] * sdm + h.to(tl.int64)[:, None] * sdh + offs_dv[None, :],
                 mask=row_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if HAS_GATE:
        t_row = tl.load(GATE_T + h, mask=row_in, other=0.0)
    else:
        t_row = h.to(tl.float32) * 0.0 + 1.0
    lrow = (b * Hq + h) * Lq + i_row
    lse = tl.load(LSE + lrow, mask=row_in, other=float("-inf"))
    row_ok = row_in & (i_row < q_len) & (lse > float("-inf"))
    L2 = tl.where(row_ok, lse * 1.4426950408889634, float("inf"))
    dlt = tl.where(row_ok, tl.load(DLT + lrow, mask=row_in, other=0.0), 0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dbias_base = (bh.to(tl.int64) * LqG + r) * NUM_SEG
    if NUM_SEG > 0:
        hi = kvl0
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 0, row_in, HAS_BIAS)
        dq, dbr = _dq_segment(dq, q, do, t_row, L2, dlt, K0, V0, sk0b, sk0n, sk0h, sv0b, sv0n, sv0h,
                              KM0 + b * skm0b, b, hkv, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d,
                              offs_dv, D, DV, BLOCK_N, CAUSAL, IEEE, HAS_MASK)
        if HAS_BIAS:
            tl.store(DBIAS + dbias_base + 0, dbr, mask=row_in)
    if NUM_SEG > 1:
        hi = kvl1
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 1, row_in, HAS_BIAS)
        dq, dbr = _dq_segment(dq, q, do, t_row, L2, dlt, K1, V1, sk1b, sk1n, sk1h, sv1b, sv1n, sv1h,
                              KM1 + b * skm1b, b, hkv, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d,
                              offs_dv, D, DV, BLOCK_N, CAUSAL, IEEE, HAS_MASK)
        if HAS_BIAS:
            tl.store(DBIAS + dbias_base + 1, dbr, mask=row_in)
    if NUM_SEG > 2:
        hi = kvl2
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 2, row_in, HAS_BIAS)
        dq, dbr = _dq_segment(dq, q, do, t_row, L2, dlt, K2, V2, sk2b, sk2n, sk2h, sv2b, sv2n, sv2h,
                              KM2 + b * skm2b, b, hkv, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d,
                              offs_dv, D, DV, BLOCK_N, CAUSAL, IEEE, HAS_MASK)
        if HAS_BIAS:
            tl.store(DBIAS + dbias_base + 2, dbr, mask=row_in)
    if NUM_SEG > 3:
        hi = kvl3
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 3, row_in, HAS_BIAS)
        dq, dbr = _dq_segment(dq, q, do, t_row, L2, dlt, K3, V3, sk3b, sk3n, sk3h, sv3b, sv3n, sv3h,
                              KM3 + b * skm3b, b, hkv, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d,
                              offs_dv, D, DV, BLOCK_N, CAUSAL, IEEE, HAS_MASK)
        if HAS_BIAS:
            tl.store(DBIAS + dbias_base + 3, dbr, mask=row_in)
    if NUM_SEG > 4:
        hi = kvl4
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 4, row_in, HAS_BIAS)
        dq, dbr = _dq_segment(dq, q, do, t_row, L2, dlt, K4, V4, sk4b, sk4n, sk4h, sv4b, sv4n, sv4h,
                              KM4 + b * skm4b, b, hkv, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d,
                              offs_dv, D, DV, BLOCK_N, CAUSAL, IEEE, HAS_MASK)
        if HAS_BIAS:
            tl.store(DBIAS + dbias_base + 4, dbr, mask=row_in)
    if NUM_SEG > 5:
        hi = kvl5
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 5, row_in, HAS_BIAS)
        dq, dbr = _dq_segment(dq, q, do, t_row, L2, dlt, K5, V5, sk5b, sk5n, sk5h, sv5b, sv5n, sv5h,
                              KM5 + b * skm5b, b, hkv, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d,
                              offs_dv, D, DV, BLOCK_N, CAUSAL, IEEE, HAS_MASK)
        if HAS_BIAS:
            tl.store(DBIAS + dbias_base + 5, dbr, mask=row_in)
    if NUM_SEG > 6:
        hi = kvl6
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 6, row_in, HAS_BIAS)
        dq, dbr = _dq_segment(dq, q, do, t_row, L2, dlt, K6, V6, sk6b, sk6n, sk6h, sv6b, sv6n, sv6h,
                              KM6 + b * skm6b, b, hkv, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d,
                              offs_dv, D, DV, BLOCK_N, CAUSAL, IEEE, HAS_MASK)
        if HAS_BIAS:
            tl.store(DBIAS + dbias_base + 6, dbr, mask=row_in)
    if NUM_SEG > 7:
        hi = kvl7
        if CAUSAL:
            hi = tl.minimum(hi, causal_hi)
        brow = _bias_row(BIAS, sbh, sbm, h, 7, row_in, HAS_BIAS)
        dq, dbr = _dq_segment(dq, q, do, t_row, L2, dlt, K7, V7, sk7b, sk7n, sk7h, sv7b, sv7n, sv7h,
                              KM7 + b * skm7b, b, hkv, hi, brow, i_row, causal_off, qk_scale, offs_n, offs_d,
                              offs_dv, D, DV, BLOCK_N, CAUSAL, IEEE, HAS_MASK)
        if HAS_BIAS:
            tl.store(DBIAS + dbias_base + 7, dbr, mask=row_in)
    tl.store(DQ + b * sdqb + i_row.to(tl.int64)[:, None] * sdqm + h.to(tl.int64)[:, None] * sdqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_in[:, None] & (offs_d[None, :] < D))


@_tuned(_DKDV_CONFIGS, _KEY)
@triton.jit
def _cross_modal_attention_bwd_dkdv_kernel(
    Q, sqb, sqm, sqh, DO, sdb, sdm, sdh,
    K, V, skb, skn, skh, svb, svn, svh, LK, seg, KM, skmb,
    KVLEN, skvb, skvm, QLEN, BIAS, sbh, sbm, GATE_T, LSE, DLT,
    DK, sdkb, sdkn, sdkh, DVP, sdvb, sdvn, sdvh,
    Lq, G, Hkv, qk_scale, scale, lq_bucket,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NUM_SEG: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hkv = bh % Hkv
    Hq = Hkv * G
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if HAS_KVLEN:
        kvl = tl.minimum(tl.maximum(tl.load(KVLEN + b * skvb + seg * skvm).to(tl.int32), 0), LK)
    else:
        kvl = LK
    if HAS_QLEN:
        q_len = tl.minimum(tl.maximum(tl.load(QLEN + b).to(tl.int32), 0), Lq)
    else:
        q_len = Lq
    keep, live = _key_mask(KM + b * skmb, n, kvl, HAS_MASK)
    nvalid = (n < kvl) & keep
    n64 = n.to(tl.int64)
    k = tl.load(K + b * skb + hkv.to(tl.int64) * skh + n64[:, None] * skn + offs_d[None, :],
                mask=nvalid[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hkv.to(tl.int64) * svh + n64[:, None] * svn + offs_dv[None, :],
                mask=nvalid[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    row_hi = tl.where((pid_n * BLOCK_N < kvl) & live, q_len * G, 0)  # all masked: zero grads, no work
    row_lo = 0
    if CAUSAL:
        causal_off = kvl - q_len
        i_min = tl.maximum(pid_n * BLOCK_N - causal_off, 0)
        row_lo = ((i_min * G) // BLOCK_M) * BLOCK_M
    for start in range(row_lo, row_hi, BLOCK_M):
        r = start + offs_m
        row_in = r < row_hi
        i_row = r // G
        h = hkv * G + r % G
        q = tl.load(Q + b * sqb + i_row.to(tl.int64)[:, None] * sqm + h.to(tl.int64)[:, None] * sqh + offs_d[None, :],
                    mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DO + b * sdb + i_row.to(tl.int64)[:, None] * sdm + h.to(tl.int64)[:, None] * sdh + offs_dv[None, :],
                     mask=row_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lrow = (b * Hq + h) * Lq + i_row
        lse = tl.load(LSE + lrow, mask=row_in, other=float("-inf"))
        row_ok = row_in & (lse > float("-inf"))
        L2 = tl.where(row_ok, lse * 1.4426950408889634, float("inf"))
        dlt = tl.where(row_ok, tl.load(DLT + lrow, mask=row_in, other=0.0), 0.0)
        if HAS_GATE:
            t_row = tl.load(GATE_T + h, mask=row_in, other=0.0)
        else:
            t_row = h.to(tl.float32) * 0.0 + 1.0
        brow = _bias_row(BIAS, sbh, sbm, h, seg, row_in, HAS_BIAS)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale + brow[None, :]
        valid = nvalid[:, None] & row_ok[None, :]
        if CAUSAL:
            valid = valid & (n[:, None] <= i_row[None, :] + causal_off)
        pt = tl.where(valid, tl.exp2(st - L2[None, :]), 0.0)
        dv += _dot((pt * t_row[None, :]).to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE) * t_row[None, :]
        dst = pt * (dpt - dlt[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
    nmask = n < LK
    tl.store(DK + b * sdkb + hkv.to(tl.int64) * sdkh + n64[:, None] * sdkn + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=nmask[:, None] & (offs_d[None, :] < D))
    tl.store(DVP + b * sdvb + hkv.to(tl.int64) * sdvh + n64[:, None] * sdvn + offs_dv[None, :],
             dv.to(DVP.dtype.element_ty), mask=nmask[:, None] & (offs_dv[None, :] < DV))

