"""Host side of the Triton cross-modal attention: launches, split-KV settings, the `triton_op` definitions.

Defines `mmkernels::triton_cross_modal_attention_fwd/bwd`, which launch the kernels of
cross_modal_attention_kernels.py (generated from its .py.in template; the layout of
the work is described there). Imports only torch and triton besides that module.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import List, Optional, Tuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from .cross_modal_attention_kernels import (
    INTERPRET,
    LOG2E,
    MAX_SEGMENTS,
    _cross_modal_attention_bwd_dkdv_kernel,
    _cross_modal_attention_bwd_dq_kernel,
    _cross_modal_attention_bwd_pre_kernel,
    _cross_modal_attention_fwd_kernel,
    _cross_modal_attention_merge_kernel,
)

# Split-KV (flash-decoding) path: taken when Lq <= SPLIT_KV_MAX_LQ and the
# padded key count of all segments >= SPLIT_KV_MIN_KEYS. NUM_SPLITS forces a
# split count (tests); see `split_kv_settings`.
SPLIT_KV_MAX_LQ = int(os.environ.get("MMKERNELS_TRITON_SPLIT_KV_MAX_LQ", "128"))
SPLIT_KV_MIN_KEYS = int(os.environ.get("MMKERNELS_TRITON_SPLIT_KV_MIN_KEYS", "2048"))
SPLIT_KV_KEYS_PER_SPLIT = 256
SPLIT_KV_NUM_SPLITS: Optional[int] = None
_SPLIT_KV_MAX_SPLITS = 64

# Under the interpreter: one small fixed config (autotuning there is very slow).
_INTERP_BLOCK_M = 16
_INTERP_BLOCK_N = 16


@contextlib.contextmanager
def split_kv_settings(min_keys: Optional[int] = None, max_lq: Optional[int] = None,
                      num_splits: Optional[int] = None, keys_per_split: Optional[int] = None):
    """Temporarily override the split-KV thresholds (tests, benchmarks)."""
    global SPLIT_KV_MIN_KEYS, SPLIT_KV_MAX_LQ, SPLIT_KV_NUM_SPLITS, SPLIT_KV_KEYS_PER_SPLIT
    saved = SPLIT_KV_MIN_KEYS, SPLIT_KV_MAX_LQ, SPLIT_KV_NUM_SPLITS, SPLIT_KV_KEYS_PER_SPLIT
    if keys_per_split is not None:
        SPLIT_KV_KEYS_PER_SPLIT = keys_per_split
    if min_keys is not None:
        SPLIT_KV_MIN_KEYS = min_keys
    if max_lq is not None:
        SPLIT_KV_MAX_LQ = max_lq
    if num_splits is not None:
        SPLIT_KV_NUM_SPLITS = num_splits
    try:
        yield
    finally:
        SPLIT_KV_MIN_KEYS, SPLIT_KV_MAX_LQ, SPLIT_KV_NUM_SPLITS, SPLIT_KV_KEYS_PER_SPLIT = saved


def _lq_bucket(rows: int) -> int:
    return min(256, triton.next_power_of_2(max(rows, 16)))


def _fixed_blocks():
    return {"BLOCK_M": _INTERP_BLOCK_M, "BLOCK_N": _INTERP_BLOCK_N} if INTERPRET else {}


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(max(int(x), 1)))


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1, which an expanded tensor such as the
    grad of out.sum() (all strides 0) breaks; the interpreter also misreads any 0 stride."""
    if t.numel() > 1 and ((t.stride(-1) != 1 and t.shape[-1] > 1) or (INTERPRET and 0 in t.stride())):
        return t.contiguous()
    return t


def _mask_bytes(kv_masks):
    """The kernels read kv_masks as bytes (bool tensors are one byte per element), unit last stride."""
    return None if kv_masks is None else [m.contiguous().view(torch.uint8) for m in kv_masks]


def _segment_args(keys, values, masks=None):
    args = []
    for m in range(MAX_SEGMENTS):
        if m < len(keys):
            k, v = keys[m], values[m]
            args += [k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), k.shape[1]]
            args += [masks[m], masks[m].stride(0)] if masks is not None else [k, 0]
        else:
            args += [keys[0], values[0], 0, 0, 0, 0, 0, 0, 0, keys[0], 0]
    return args


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_kv_splits(q: torch.Tensor, B: int, Hkv: int, Lq: int, G: int, total_keys: int) -> int:
    """How many KV splits the forward uses (1 = no split-KV)."""
    if Lq > SPLIT_KV_MAX_LQ or total_keys < SPLIT_KV_MIN_KEYS or total_keys == 0:
        return 1
    if SPLIT_KV_NUM_SPLITS is not None:
        return max(1, min(int(SPLIT_KV_NUM_SPLITS), _SPLIT_KV_MAX_SPLITS))
    sms = _num_sms(q.device.index or 0) if q.device.type == "cuda" else 4
    programs = max(1, B * Hkv * triton.cdiv(Lq * G, 64))
    ns = min(triton.cdiv(4 * sms, programs), triton.cdiv(total_keys, SPLIT_KV_KEYS_PER_SPLIT), _SPLIT_KV_MAX_SPLITS)
    return max(1, ns)


def _flags(q, keys, kv_lengths, q_lengths, modality_bias, head_gate, causal, kv_masks=None):
    return dict(
        NUM_SEG=len(keys), HAS_KVLEN=kv_lengths is not None, HAS_QLEN=q_lengths is not None,
        HAS_BIAS=modality_bias is not None, HAS_GATE=head_gate is not None, CAUSAL=bool(causal),
        IEEE=q.dtype == torch.float32, HAS_MASK=kv_masks is not None,
    )


def _optional_args(q, kv_lengths, q_lengths, modality_bias, gate_t):
    kvl = kv_lengths if kv_lengths is not None else q
    skvb, skvm = (kv_lengths.stride(0), kv_lengths.stride(1)) if kv_lengths is not None else (0, 0)
    bias = modality_bias if modality_bias is not None else q
    sbh, sbm = (modality_bias.stride(0), modality_bias.stride(1)) if modality_bias is not None else (0, 0)
    qlen = q_lengths.contiguous() if q_lengths is not None else q  # the kernels index it with stride 1
    return [kvl, skvb, skvm, qlen, bias, sbh, sbm,
            gate_t if gate_t is not None else q]


# The schemas are written out (as in csrc/ops.cpp) because infer_schema cannot state `Tensor[]? kv_masks`.
_FWD_SCHEMA = ("(Tensor q, Tensor[] keys, Tensor[] values, Tensor? kv_lengths, Tensor? q_lengths, "
               "Tensor? modality_bias, Tensor? head_gate, float scale, bool causal, Tensor[]? kv_masks=None) "
               "-> (Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor[] keys, Tensor[] values, Tensor out_ungated, "
               "Tensor lse, Tensor? kv_lengths, Tensor? q_lengths, Tensor? modality_bias, Tensor? head_gate, "
               "float scale, bool causal, Tensor[]? kv_masks=None) -> (Tensor, Tensor[], Tensor[], Tensor, Tensor)")


@triton_op("mmkernels::triton_cross_modal_attention_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def triton_cross_modal_attention_fwd(
    q: torch.Tensor,
    keys: List[torch.Tensor],
    values: List[torch.Tensor],
    kv_lengths: Optional[torch.Tensor],
    q_lengths: Optional[torch.Tensor],
    modality_bias: Optional[torch.Tensor],
    head_gate: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    kv_masks: Optional[List[torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Lq, Hq, D = q.shape
    Hkv, Dv = keys[0].shape[2], values[0].shape[3]
    G = Hq // Hkv
    q, keys, values = _kernel_layout(q), [_kernel_layout(k) for k in keys], [_kernel_layout(v) for v in values]
    out = q.new_empty((B, Lq, Hq, Dv))
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    out_u = q.new_empty((B, Lq, Hq, Dv)) if head_gate is not None else q.new_empty((0,))
    if B * Lq * Hq == 0:
        return out, lse, out_u
    gate_t = torch.tanh(head_gate.float()).contiguous() if head_gate is not None else None
    total_keys = sum(int(k.shape[1]) for k in keys)
    ns = num_kv_splits(q, B, Hkv, Lq, G, total_keys)
    split = ns > 1
    # Written-to kernel arguments never alias one another (torch.compile's mutation
    # analysis of user kernels): unused outputs get a 1-element dummy.
    dummy = q.new_empty((1,), dtype=torch.float32)
    if split:
        opart = q.new_empty((B, Hkv, ns, Lq * G, Dv), dtype=torch.float32)
        lpart = q.new_empty((B, Hkv, ns, Lq * G), dtype=torch.float32)
    else:
        opart = lpart = dummy
    flags = _flags(q, keys, kv_lengths, q_lengths, modality_bias, head_gate, causal, kv_masks)
    masks = _mask_bytes(kv_masks)
    BD, BDV = _pow2(D), _pow2(Dv)
    LqG = Lq * G

    def grid(meta):
        return (triton.cdiv(LqG, meta["BLOCK_M"]), B * Hkv, ns)

    wrap_triton(_cross_modal_attention_fwd_kernel)[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        *_segment_args(keys, values, masks),
        *_optional_args(q, kv_lengths, q_lengths, modality_bias, gate_t),
        out, out_u if head_gate is not None else dummy, out.stride(0), out.stride(1), out.stride(2),
        lse, opart, lpart,
        Lq, G, Hkv, ns, float(scale) * LOG2E, _lq_bucket(LqG),
        D=D, DV=Dv, BLOCK_D=BD, BLOCK_DV=BDV, SPLIT=split, **flags, **_fixed_blocks(),
    )
    if split:
        wrap_triton(_cross_modal_attention_merge_kernel)[(LqG, B * Hkv)](
            opart, lpart, out, out_u if head_gate is not None else dummy,
            out.stride(0), out.stride(1), out.stride(2), lse, gate_t if gate_t is not None else q,
            Lq, G, Hkv, ns,
            DV=Dv, BLOCK_DV=BDV, NS_P2=max(2, triton.next_power_of_2(ns)), HAS_GATE=head_gate is not None,
        )
    return out, lse, out_u


@triton_op("mmkernels::triton_cross_modal_attention_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def triton_cross_modal_attention_bwd(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    q: torch.Tensor,
    keys: List[torch.Tensor],
    values: List[torch.Tensor],
    out_ungated: torch.Tensor,
    lse: torch.Tensor,
    kv_lengths: Optional[torch.Tensor],
    q_lengths: Optional[torch.Tensor],
    modality_bias: Optional[torch.Tensor],
    head_gate: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    kv_masks: Optional[List[torch.Tensor]] = None,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor], torch.Tensor, torch.Tensor]:
    B, Lq, Hq, D = q.shape
    Hkv, Dv = keys[0].shape[2], values[0].shape[3]
    G = Hq // Hkv
    M = len(keys)
    dq = torch.empty_like(q)
    dks = [torch.empty_like(k) for k in keys]
    dvs = [torch.empty_like(v) for v in values]
    if B * Hkv == 0 or (Lq == 0 and sum(int(k.shape[1]) for k in keys) == 0):
        return dq, dks, dvs, q.new_zeros((Hq, M), dtype=torch.float32), q.new_zeros((Hq,), dtype=torch.float32)
    q, keys, values = _kernel_layout(q), [_kernel_layout(k) for k in keys], [_kernel_layout(v) for v in values]
    grad_out, out_ungated = _kernel_layout(grad_out), _kernel_layout(out_ungated)
    gate_t = torch.tanh(head_gate.float()).contiguous() if head_gate is not None else None
    lse = lse.float().contiguous()
    BD, BDV = _pow2(D), _pow2(Dv)
    LqG = Lq * G
    flags = _flags(q, keys, kv_lengths, q_lengths, modality_bias, head_gate, causal, kv_masks)
    masks = _mask_bytes(kv_masks)
    opt = _optional_args(q, kv_lengths, q_lengths, modality_bias, gate_t)

    rowdot = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    n_rows = B * Lq * Hq
    if n_rows > 0:
        BLOCK_R = 16 if INTERPRET else max(1, min(64, 4096 // BDV))
        wrap_triton(_cross_modal_attention_bwd_pre_kernel)[(triton.cdiv(n_rows, BLOCK_R),)](
            grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            out_ungated, out_ungated.stride(0), out_ungated.stride(1), out_ungated.stride(2),
            rowdot, Lq, Hq, n_rows, DV=Dv, BLOCK_DV=BDV, BLOCK_R=BLOCK_R,
        )
    dlt = rowdot * gate_t[None, :, None] if gate_t is not None else rowdot
    if grad_lse is not None:
        dlt = dlt - grad_lse.float()
    dlt = dlt.contiguous()
    dbias = (q.new_empty((B, Hkv, LqG, M), dtype=torch.float32) if modality_bias is not None
             else q.new_empty((1,), dtype=torch.float32))
    common = dict(D=D, DV=Dv, BLOCK_D=BD, BLOCK_DV=BDV, **flags, **_fixed_blocks())
    if LqG > 0:
        wrap_triton(_cross_modal_attention_bwd_dq_kernel)[lambda meta: (triton.cdiv(LqG, meta["BLOCK_M"]), B * Hkv)](
            q, q.stride(0), q.stride(1), q.stride(2),
            grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            *_segment_args(keys, values, masks), *opt, lse, dlt,
            dq, dq.stride(0), dq.stride(1), dq.stride(2), dbias,
            Lq, G, Hkv, float(scale) * LOG2E, float(scale), _lq_bucket(LqG), **common,
        )
    for m in range(M):
        k, v, dk, dv = keys[m], values[m], dks[m], dvs[m]
        Lk = k.shape[1]
        if Lk == 0:
            continue

        def grid_kv(meta, Lk=Lk):
            return (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)

        wrap_triton(_cross_modal_attention_bwd_dkdv_kernel)[grid_kv](
            q, q.stride(0), q.stride(1), q.stride(2),
            grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), Lk, m,
            masks[m] if masks is not None else k, masks[m].stride(0) if masks is not None else 0,
            *opt, lse, dlt,
            dk, dk.stride(0), dk.stride(1), dk.stride(2), dv, dv.stride(0), dv.stride(1), dv.stride(2),
            Lq, G, Hkv, float(scale) * LOG2E, float(scale), _lq_bucket(LqG), **common,
        )
    if modality_bias is not None:
        grad_bias = dbias.view(B, Hkv, Lq, G, M).sum(dim=(0, 2)).reshape(Hq, M)
    else:
        grad_bias = q.new_zeros((Hq, M), dtype=torch.float32)
    if gate_t is not None:
        grad_gate = (1.0 - gate_t * gate_t) * rowdot.sum(dim=(0, 2))
    else:
        grad_gate = q.new_zeros((Hq,), dtype=torch.float32)
    return dq, dks, dvs, grad_bias, grad_gate
