"""Triton kernels of gated fusion: one pass over memory forward, one backward.

Inputs are flattened (M, N, H) (the entry point reshapes); a program owns
BLOCK columns e of the flattened (N*H) axis and loads the (M_P2, BLOCK) tile of
all modalities at once, so the softmax over modalities happens in registers.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("MMKERNELS_TRITON_AUTOTUNE", "1") != "0"
_INTERP_BLOCK = 64

# The first entry is the no-autotune default (MMKERNELS_TRITON_AUTOTUNE=0).
_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
]


def _tuned(kernel):
    if INTERPRET:
        return kernel
    return triton.autotune(configs=_CONFIGS if AUTOTUNE else _CONFIGS[:1],
                           key=["M", "ACT", "HAS_P", "nh_bucket"])(kernel)


def _nh_bucket(nh: int) -> int:
    """Positions per modality rounded up to a power of two, at most 2^20: small calls (where
    big blocks leave SMs idle) tune apart from large ones without a retune per batch size."""
    return min(1 << 20, triton.next_power_of_2(max(nh, 16)))  # >= 16: no value specialisation


def _fixed():
    return {"BLOCK": _INTERP_BLOCK} if INTERPRET else {}


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _gates(L, P, off, e, mask, N, H, HAS_P: tl.constexpr, MP2: tl.constexpr):
    m = tl.arange(0, MP2)
    logit = tl.load(L + off, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_P:
        n = e // H
        pres = tl.load(P + m[:, None].to(tl.int64) * N + n[None, :], mask=mask, other=0)
        logit = tl.where(pres != 0, logit, float("-inf"))
    mx = tl.max(logit, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # all -inf: exp gives 0 for every logit, no NaN
    ex = tl.exp(logit - mx[None, :])
    s = tl.sum(ex, 0)
    # A -inf logit (absent, or -inf itself) gets a gate of exactly 0. The kernels select the
    # features of a 0 gate out rather than multiply them, so a NaN or inf there cannot reach
    # the result or the gradients (0 * NaN); the gate itself keeps no extra mask alive.
    return ex / tl.where(s > 0, s, 1.0)[None, :]


@triton.jit
def _tile(NH, M: tl.constexpr, MP2: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK positions of the flattened (N*H) axis, for all M modalities."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = tl.arange(0, MP2)
    emask = e < NH
    mask = (m[:, None] < M) & emask[None, :]
    off = m[:, None].to(tl.int64) * NH + e[None, :]
    return e, emask, mask, off


@_tuned
@triton.jit
def _gf_fwd_kernel(F, L, P, OUT, GATES, N, H, NH, nh_bucket,
                   M: tl.constexpr, MP2: tl.constexpr, HAS_P: tl.constexpr, ACT: tl.constexpr,
                   RET_G: tl.constexpr, BLOCK: tl.constexpr):
    e, emask, mask, off = _tile(NH, M, MP2, BLOCK)
    g = _gates(L, P, off, e, mask, N, H, HAS_P, MP2)
    f = tl.where(g != 0.0, tl.load(F + off, mask=mask, other=0.0).to(tl.float32), 0.0)
    if ACT == 0:
        f = _tanh(f)
    fused = tl.sum(g * f, 0)
    tl.store(OUT + e, fused.to(OUT.dtype.element_ty), mask=emask)
    if RET_G:
        tl.store(GATES + off, g.to(GATES.dtype.element_ty), mask=mask)


@_tuned
@triton.jit
def _gf_bwd_kernel(GF, GG, F, L, P, DF, DL, N, H, NH, nh_bucket,
                   M: tl.constexpr, MP2: tl.constexpr, HAS_P: tl.constexpr, ACT: tl.constexpr,
                   HAS_GG: tl.constexpr, BLOCK: tl.constexpr):
    e, emask, mask, off = _tile(NH, M, MP2, BLOCK)
    g = _gates(L, P, off, e, mask, N, H, HAS_P, MP2)
    f = tl.where(g != 0.0, tl.load(F + off, mask=mask, other=0.0).to(tl.float32), 0.0)
    gf = tl.load(GF + e, mask=emask, other=0.0).to(tl.float32)
    if ACT == 0:
        a = _tanh(f)
        dact = 1.0 - a * a
    else:
        a = f
        dact = f * 0.0 + 1.0
    dg = gf[None, :] * a
    if HAS_GG:
        dg += tl.load(GG + off, mask=mask, other=0.0).to(tl.float32)
    sdg = tl.sum(g * dg, 0)
    dl = g * (dg - sdg[None, :])
    df = gf[None, :] * g * dact
    tl.store(DF + off, df.to(DF.dtype.element_ty), mask=mask)
    tl.store(DL + off, dl.to(DL.dtype.element_ty), mask=mask)


def _present_arg(present, features):
    if present is None:
        return features, False
    return present.contiguous().view(torch.uint8), True


@triton_op("mmkernels::triton_gated_fusion_fwd", mutates_args=())
def triton_gated_fusion_fwd(
    features: torch.Tensor,
    gate_logits: torch.Tensor,
    present: Optional[torch.Tensor],
    activation: int,
    return_gates: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    M, N, H = features.shape
    fused = features.new_empty((N, H))
    gates = features.new_empty((M, N, H)) if return_gates else features.new_empty((0,))
    NH = N * H
    if NH == 0:
        return fused, gates
    f = features.contiguous()
    lg = gate_logits.contiguous()
    p, has_p = _present_arg(present, features)
    wrap_triton(_gf_fwd_kernel)[lambda meta: (triton.cdiv(NH, meta["BLOCK"]),)](
        f, lg, p, fused, gates if return_gates else features.new_empty((1,)), N, H, NH, _nh_bucket(NH),
        M=M, MP2=triton.next_power_of_2(M), HAS_P=has_p, ACT=int(activation), RET_G=bool(return_gates),
        **_fixed(),
    )
    return fused, gates


@triton_op("mmkernels::triton_gated_fusion_bwd", mutates_args=())
def triton_gated_fusion_bwd(
    grad_fused: torch.Tensor,
    grad_gates: Optional[torch.Tensor],
    features: torch.Tensor,
    gate_logits: torch.Tensor,
    present: Optional[torch.Tensor],
    activation: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    M, N, H = features.shape
    df = torch.empty_like(features)
    dl = torch.empty_like(gate_logits)
    NH = N * H
    if NH == 0:
        return df, dl
    if not (df.is_contiguous() and dl.is_contiguous()):
        df, dl = features.new_empty((M, N, H)), gate_logits.new_empty((M, N, H))
    f = features.contiguous()
    lg = gate_logits.contiguous()
    gfu = grad_fused.contiguous()
    gg = grad_gates.contiguous() if grad_gates is not None else f
    p, has_p = _present_arg(present, features)
    wrap_triton(_gf_bwd_kernel)[lambda meta: (triton.cdiv(NH, meta["BLOCK"]),)](
        gfu, gg, f, lg, p, df, dl, N, H, NH, _nh_bucket(NH),
        M=M, MP2=triton.next_power_of_2(M), HAS_P=has_p, ACT=int(activation), HAS_GG=grad_gates is not None,
        **_fixed(),
    )
    return df, dl
