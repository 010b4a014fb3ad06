"""gated_fusion: public entry point, input checks, fake kernels, autograd.

Kernels see flattened contiguous (M, N, H) inputs; the C++ ops
`mmkernels::gated_fusion_fwd` / `gated_fusion_bwd` and the Triton ops
`mmkernels::triton_gated_fusion_fwd` / `triton_gated_fusion_bwd` share one
signature and so share the fake kernels and autograd registered here.
"""
from __future__ import annotations

from typing import Optional

import torch

from mmkernels import backends, reference
from mmkernels.ops._autograd import REGISTER, forbid_double_backward, register_autograd, run_fwd
from mmkernels.ops._checks import check_dtype, check_same_device

ACTIVATIONS = {"tanh": 0, "identity": 1}


def check_inputs(features, gate_logits, present, activation):
    for name, t in (("features", features), ("gate_logits", gate_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor (M, *, H), got {type(t).__name__}")
    if features.dim() < 2:
        raise ValueError(f"features must have shape (M, *, H) with at least 2 dims, got {tuple(features.shape)}")
    check_dtype("features", features, backends.FLOAT_DTYPES + (torch.float64,))
    if gate_logits.shape != features.shape:
        raise ValueError(f"gate_logits must have the shape of features {tuple(features.shape)}, got {tuple(gate_logits.shape)}")
    if gate_logits.dtype != features.dtype:
        raise TypeError(f"gate_logits must have features' dtype {features.dtype}, got {gate_logits.dtype}")
    check_same_device("gate_logits", gate_logits, features)
    M = features.shape[0]
    if not 1 <= M <= backends.MAX_SEGMENTS:
        raise ValueError(f"the number of modalities M (features.shape[0]) must be between 1 and {backends.MAX_SEGMENTS}, got {M}")
    if present is not None:
        if not isinstance(present, torch.Tensor):
            raise TypeError(f"present must be a bool tensor of shape {tuple(features.shape[:-1])}, got {type(present).__name__}")
        if present.dtype != torch.bool:
            raise TypeError(f"present must have dtype bool, got {present.dtype}")
        if present.shape != features.shape[:-1]:
            raise ValueError(f"present must have shape (M, *) = {tuple(features.shape[:-1])}, got {tuple(present.shape)}")
        check_same_device("present", present, features)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


# ---------------------------------------------------------------- fake kernels
def _fake_fwd(features, gate_logits, present, activation, return_gates):
    M, N, H = features.shape
    fused = features.new_empty((N, H))
    gates = features.new_empty((M, N, H)) if return_gates else features.new_empty((0,))
    return fused, gates


def _fake_bwd(grad_fused, grad_gates, features, gate_logits, present, activation):
    return torch.empty_like(features), torch.empty_like(gate_logits)


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    features, gate_logits, present, activation, _ = inputs
    ctx.activation = activation
    ctx.save_for_backward(features, gate_logits, present)


def make_backward(bwd_op):
    def backward(ctx, grad_fused, grad_gates):
        features, gate_logits, present = ctx.saved_tensors
        if grad_gates is not None and grad_gates.numel() == 0:
            grad_gates = None
        gf, gl = bwd_op(grad_fused.contiguous(), None if grad_gates is None else grad_gates.contiguous(),
                        features, gate_logits, present, ctx.activation)
        return gf, gl, None, None, None

    return backward


def register(fwd_name: str, bwd_name: str) -> None:
    torch.library.register_fake(f"mmkernels::{fwd_name}")(_fake_fwd)
    torch.library.register_fake(f"mmkernels::{bwd_name}")(_fake_bwd)
    register_autograd(fwd_name, make_backward(getattr(torch.ops.mmkernels, bwd_name)), _setup_context)
    forbid_double_backward(bwd_name, "gated_fusion")


if backends.extension_error() is None:
    register("gated_fusion_fwd", "gated_fusion_bwd")

REGISTER["gated_fusion"] = register


# ---------------------------------------------------------------- entry point
def gated_fusion(
    features: torch.Tensor,
    gate_logits: torch.Tensor,
    present: Optional[torch.Tensor] = None,
    activation: str = "tanh",
    return_gates: bool = False,
    backend: Optional[str] = None,
):
    """sum_m softmax_m(gate_logits)[m] * act(features[m]) over present modalities.

    features, gate_logits (M, *, H); present bool (M, *). Returns (*, H), and
    the gate weights (M, *, H) if return_gates. See DESIGN.md 2.2.
    """
    check_inputs(features, gate_logits, present, activation)
    call = backends.Call("gated_fusion", features.device.type, features.dtype, features.shape[0])
    name = backends.select(call, backend)
    if name == "reference":
        return reference.gated_fusion_reference(features, gate_logits, present, activation, return_gates)
    if name == "triton":
        from mmkernels.ops import _load_triton  # noqa: F401  (the backend's load step, once)

        fwd_name = "triton_gated_fusion_fwd"
    else:
        fwd_name = "gated_fusion_fwd"
    M, H = features.shape[0], features.shape[-1]
    lead = features.shape[1:-1]
    f3 = features.reshape(M, -1, H).contiguous()
    l3 = gate_logits.reshape(M, -1, H).contiguous()
    p2 = None if present is None else present.reshape(M, -1).contiguous()
    fused, gates = run_fwd(fwd_name, (f3, l3, p2, ACTIVATIONS[activation], bool(return_gates)), (f3, l3))
    fused = fused.reshape(*lead, H)
    if return_gates:
        return fused, gates.reshape(features.shape)
    return fused
