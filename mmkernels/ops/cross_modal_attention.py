"""cross_modal_attention: public entry point, input checks, fake kernels, autograd.

The C++ ops `mmkernels::cross_modal_attention_fwd` / `cross_modal_attention_bwd` (csrc/ops.cpp) and the Triton ops
`mmkernels::triton_cross_modal_attention_fwd` / `triton_cross_modal_attention_bwd` share one signature, so they
share the fake kernels and the autograd formula registered here.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from mmkernels import backends, reference
from mmkernels.ops._autograd import REGISTER, forbid_double_backward, register_autograd, run_fwd
from mmkernels.ops._checks import check_dtype, check_lengths, check_same_device



def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_kv_masks(kv_masks, q, keys):
    """The op's kv_masks: None, or one bool (B, Lk_m) per segment (a None entry: every key)."""
    if kv_masks is None:
        return None
    if isinstance(kv_masks, torch.Tensor):
        raise TypeError("kv_masks must be a sequence with one bool (B, Lk_m) tensor (or None) per modality, not a tensor")
    kv_masks = list(kv_masks)
    if len(kv_masks) != len(keys):
        raise ValueError(f"kv_masks must have one entry per modality ({len(keys)}), got {len(kv_masks)}")
    B = q.shape[0]
    out = []
    for m, (mask, k) in enumerate(zip(kv_masks, keys)):
        if mask is None:
            out.append(torch.ones(B, k.shape[1], dtype=torch.bool, device=q.device))
            continue
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"kv_masks[{m}] must be a bool tensor (B, Lk_m) or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"kv_masks[{m}] must be a bool tensor (True = attend), got {mask.dtype}")
        check_same_device(f"kv_masks[{m}]", mask, q)
        if tuple(mask.shape) != (B, k.shape[1]):
            raise ValueError(f"kv_masks[{m}] must have shape (B, Lk_{m}) = {(B, k.shape[1])}, got {tuple(mask.shape)}")
        out.append(mask)
    return out


_Q_DTYPES = backends.FLOAT_DTYPES + (torch.float64,)


def check_inputs(q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, causal):
    """Raise ValueError/TypeError naming the argument and what was expected."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a tensor (B, Lq, Hq, D), got {type(q).__name__}")
    if isinstance(keys, torch.Tensor) or isinstance(values, torch.Tensor):
        raise TypeError("keys and values must be sequences of tensors (one per modality), not a tensor")
    keys, values = list(keys), list(values)
    if len(keys) != len(values):
        raise ValueError(f"keys and values must have the same number of modalities, got {len(keys)} and {len(values)}")
    M = len(keys)
    if not 1 <= M <= backends.MAX_SEGMENTS:
        raise ValueError(f"the number of modalities M must be between 1 and {backends.MAX_SEGMENTS}, got {M}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, Lq, Hq, D), got {tuple(q.shape)}")
    check_dtype("q", q, _Q_DTYPES)
    B, Lq, Hq, D = q.shape
    q_dtype, q_device = q.dtype, q.device
    Hkv = Dv = None
    # This runs on every call: argument names are formatted only for an error, and each tensor's
    # shape is read once (a tensor attribute costs a few hundred ns).
    for m, (k, v) in enumerate(zip(keys, values)):
        shapes = []
        for kind, t in (("keys", k), ("values", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{kind}[{m}] must be a tensor, got {type(t).__name__}")
            shape = t.shape
            if len(shape) != 4:
                raise ValueError(f"{kind}[{m}] must have shape (B, Lk, Hkv, D), got {tuple(shape)}")
            if t.dtype != q_dtype:
                raise TypeError(f"{kind}[{m}] must have q's dtype {q_dtype}, got {t.dtype}")
            if t.device != q_device:
                check_same_device(f"{kind}[{m}]", t, q)
            if shape[0] != B:
                raise ValueError(f"{kind}[{m}] has batch {shape[0]}, expected q's batch {B}")
            if t.stride(-1) != 1 and t.numel():
                raise ValueError(f"{kind}[{m}] must be contiguous in its last dim (stride 1), got stride {t.stride(-1)}")
            shapes.append(shape)
        (_, k_len, k_heads, k_dim), (_, v_len, v_heads, v_dim) = shapes
        if k_len != v_len:
            raise ValueError(f"keys[{m}] and values[{m}] must have the same length, got {k_len} and {v_len}")
        if k_dim != D:
            raise ValueError(f"keys[{m}] must have head dim D={D} like q, got {k_dim}")
        Hkv = k_heads if Hkv is None else Hkv
        Dv = v_dim if Dv is None else Dv
        if k_heads != Hkv or v_heads != Hkv:
            raise ValueError(f"keys[{m}] and values[{m}] must have {Hkv} kv heads like keys[0], got {k_heads} and {v_heads}")
        if v_dim != Dv:
            raise ValueError(f"values[{m}] must have value dim Dv={Dv} like values[0], got {v_dim}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    if q.stride(-1) != 1 and q.numel():
        raise ValueError(f"q must be contiguous in its last dim (stride 1), got stride {q.stride(-1)}")
    if kv_lengths is not None:
        check_lengths("kv_lengths", kv_lengths, (B, M), [k.shape[1] for k in keys], q)
    if q_lengths is not None:
        check_lengths("q_lengths", q_lengths, (B,), [Lq], q)
    for name, t, shape, dims in (
        ("modality_bias", modality_bias, (Hq, M), "(Hq, M)"),
        ("head_gate", head_gate, (Hq,), "(Hq,)"),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of shape {dims} = {shape}, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {dims} = {shape}, got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, q.dtype):
            raise TypeError(f"{name} must be float32 or q's dtype {q.dtype}, got {t.dtype}")
        check_same_device(name, t, q)
    if causal and M != 1:
        raise ValueError(f"causal=True needs exactly one modality (M == 1), got M={M}")
    return keys, values


# ---------------------------------------------------------------- fake kernels
def _fake_fwd(q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, scale, causal, kv_masks=None):
    B, Lq, Hq, _ = q.shape
    Dv = values[0].shape[-1]
    out = q.new_empty((B, Lq, Hq, Dv))
    lse = q.new_empty((B, Hq, Lq), dtype=_acc_dtype(q.dtype))
    out_ungated = q.new_empty((B, Lq, Hq, Dv)) if head_gate is not None else q.new_empty((0,))
    return out, lse, out_ungated


def _fake_bwd(grad_out, grad_lse, q, keys, values, out_ungated, lse, kv_lengths, q_lengths,
              modality_bias, head_gate, scale, causal, kv_masks=None):
    acc = _acc_dtype(q.dtype)
    Hq = q.shape[2]
    return (
        torch.empty_like(q),
        [torch.empty_like(k) for k in keys],
        [torch.empty_like(v) for v in values],
        q.new_empty((Hq, len(keys)), dtype=acc),
        q.new_empty((Hq,), dtype=acc),
    )


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, scale, causal = inputs[:9]
    kv_masks = inputs[9] if len(inputs) > 9 else None
    out, lse, out_ungated = output
    ctx.num_segments = len(keys)
    ctx.has_masks = kv_masks is not None
    ctx.num_inputs = len(inputs)  # 9 when the call left kv_masks to the schema's default
    ctx.scale, ctx.causal = scale, causal
    ctx.bias_dtype = None if modality_bias is None else modality_bias.dtype
    ctx.gate_dtype = None if head_gate is None else head_gate.dtype
    saved_out = out_ungated if head_gate is not None else out
    ctx.save_for_backward(q, *keys, *values, saved_out, lse, kv_lengths, q_lengths, modality_bias, head_gate,
                          *(kv_masks or ()))


def make_backward(bwd_op):
    """Autograd formula of a fwd op whose fused backward is `bwd_op`."""

    def backward(ctx, grad_out, grad_lse, _grad_out_ungated):
        M = ctx.num_segments
        saved = ctx.saved_tensors
        q, keys, values = saved[0], list(saved[1 : 1 + M]), list(saved[1 + M : 1 + 2 * M])
        out, lse, kv_lengths, q_lengths, modality_bias, head_gate = saved[1 + 2 * M : 7 + 2 * M]
        kv_masks = list(saved[7 + 2 * M :]) if ctx.has_masks else None
        gq, gk, gv, gbias, ggate = bwd_op(
            grad_out, grad_lse, q, keys, values, out, lse, kv_lengths, q_lengths,
            modality_bias, head_gate, ctx.scale, ctx.causal, kv_masks,
        )
        gbias = None if ctx.bias_dtype is None else gbias.to(ctx.bias_dtype)
        ggate = None if ctx.gate_dtype is None else ggate.to(ctx.gate_dtype)
        grads = (gq, gk, gv, None, None, gbias, ggate, None, None)
        if ctx.num_inputs > 9:  # the structure of the inputs: a list of None per mask
            grads += ([None] * M if ctx.has_masks else None,)
        return grads

    return backward


def register(fwd_name: str, bwd_name: str) -> None:
    """Fake kernels and autograd for a (fwd, bwd) pair with the shared signature."""
    torch.library.register_fake(f"mmkernels::{fwd_name}")(_fake_fwd)
    torch.library.register_fake(f"mmkernels::{bwd_name}")(_fake_bwd)
    register_autograd(fwd_name, make_backward(getattr(torch.ops.mmkernels, bwd_name)), _setup_context)
    forbid_double_backward(bwd_name, "cross_modal_attention")


if backends.extension_error() is None:
    register("cross_modal_attention_fwd", "cross_modal_attention_bwd")

REGISTER["cross_modal_attention"] = register


# ---------------------------------------------------------------- entry point
def _run_backend(name, q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, scale, causal, kv_masks):
    if name == "reference":
        return reference.cross_modal_attention_reference(
            q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, scale, causal, return_lse=True,
            kv_masks=kv_masks,
        )
    if name == "triton":
        from mmkernels.ops import _load_triton  # noqa: F401  (the backend's load step, once)

        fwd_name = "triton_cross_modal_attention_fwd"
    else:  # cpu and cuda: the C++ op, dispatched on the device of q
        fwd_name = "cross_modal_attention_fwd"
    # every argument given: leaving kv_masks to the schema's default makes the autograd wrapper fill it
    # in on each call (30 us)
    inputs = (q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, scale, causal, kv_masks)
    differentiable = (q, *keys, *values, *(t for t in (modality_bias, head_gate) if t is not None))
    out, lse, _ = run_fwd(fwd_name, inputs, differentiable)
    return out, lse


def cross_modal_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    kv_lengths: Optional[torch.Tensor] = None,
    q_lengths: Optional[torch.Tensor] = None,
    modality_bias: Optional[torch.Tensor] = None,
    head_gate: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    return_lse: bool = False,
    backend: Optional[str] = None,
    kv_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
):
    """Attention of q over the valid keys of M modalities with one softmax.

    q (B, Lq, Hq, D); keys[m] (B, Lk_m, Hkv, D); values[m] (B, Lk_m, Hkv, Dv);
    kv_lengths int (B, M); q_lengths int (B,); modality_bias (Hq, M); head_gate
    (Hq,); kv_masks: per modality None or a bool (B, Lk_m), True = attend (any
    pattern: left padding, holes), together with kv_lengths if both are given.
    Returns out (B, Lq, Hq, Dv), and lse (B, Hq, Lq) if return_lse.
    See DESIGN.md 2.1 for the exact semantics; with causal=True the offset comes
    from the lengths (kv_len - q_len), the masks only remove keys.
    """
    keys, values = check_inputs(q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, causal)
    kv_masks = check_kv_masks(kv_masks, q, keys)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    call = backends.Call(
        "cross_modal_attention", q.device.type, q.dtype, len(keys), q.shape[-1], values[0].shape[-1],
        key_masks=kv_masks is not None,
    )
    name = backends.select(call, backend)
    out, lse = _run_backend(
        name, q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, float(scale), bool(causal), kv_masks
    )
    return (out, lse) if return_lse else out
