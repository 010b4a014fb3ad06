"""Plain-PyTorch reference of every mmkernels op.

Readable rather than fast: it materialises the full score matrix. It runs on any
device and dtype (fp64 included), is differentiable through autograd, and is the
ground truth that every backend is tested against.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _valid_keys_mask(keys, kv_lengths, batch: int, device, kv_masks=None) -> torch.Tensor:
    """Boolean (B, sum Lk) mask: True where key j of the concatenated KV is valid: within
    kv_lengths[b, m] and, with kv_masks, where kv_masks[m][b, j] is True."""
    masks = []
    for m, k in enumerate(keys):
        pos = torch.arange(k.shape[1], device=device)
        if kv_lengths is None:
            valid = torch.ones(batch, k.shape[1], dtype=torch.bool, device=device)
        else:
            valid = pos[None, :] < kv_lengths[:, m : m + 1].to(device)
        if kv_masks is not None and kv_masks[m] is not None:
            valid = valid & kv_masks[m].to(device=device, dtype=torch.bool)
        masks.append(valid)
    return torch.cat(masks, dim=1)


def cross_modal_attention_reference(
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
    upcast: bool = True,
    kv_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
):
    """DESIGN.md 2.1, computed on the concatenated keys with explicit masks.

    kv_masks: per segment None or a bool (B, Lk_m), True = attend. A key is valid
    when it is within kv_lengths and its mask allows it; the causal offset still
    comes from the lengths (kv_len - q_len), so a left-padded batch (masks, no
    lengths) is aligned bottom-right on the tensor positions, as transformers does.

    Accumulates in fp32 for low-precision inputs (fp64 stays fp64) and returns
    the output in q's dtype; lse is fp32 (fp64 for fp64 inputs). upcast=False
    computes in q's own dtype: the yardstick of the tests' tolerance rule.
    """
    B, Lq, Hq, D = q.shape
    Hkv = keys[0].shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not upcast:
        acc = q.dtype
    if scale is None:
        scale = D**-0.5
    device = q.device

    k = torch.cat([t.to(acc) for t in keys], dim=1)  # (B, Lk, Hkv, D)
    v = torch.cat([t.to(acc) for t in values], dim=1)
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q.to(acc), k) * scale  # (B, Hq, Lq, Lk)

    segment = torch.cat(
        [torch.full((t.shape[1],), m, device=device, dtype=torch.long) for m, t in enumerate(keys)]
    )
    if modality_bias is not None:
        logits = logits + modality_bias.to(acc)[:, segment][None, :, None, :]

    valid = _valid_keys_mask(keys, kv_lengths, B, device, kv_masks)[:, None, None, :]  # (B,1,1,Lk)
    if q_lengths is not None:
        q_valid = torch.arange(Lq, device=device)[None, :] < q_lengths.to(device)[:, None]
    else:
        q_valid = torch.ones(B, Lq, dtype=torch.bool, device=device)
    valid = valid & q_valid[:, None, :, None]
    if causal:
        # Bottom-right aligned on the valid lengths: query i sees key j iff
        # j <= i + (kv_len - q_len). Lengths are clamped into [0, L] first, as the
        # kernels do where they cannot check them (GPU, torch.compile).
        kv_len = (
            kv_lengths[:, 0].to(device).clamp(0, keys[0].shape[1])
            if kv_lengths is not None
            else torch.full((B,), keys[0].shape[1], device=device)
        )
        q_len = q_lengths.to(device).clamp(0, Lq) if q_lengths is not None else torch.full((B,), Lq, device=device)
        i = torch.arange(Lq, device=device)[None, :, None]
        j = torch.arange(k.shape[1], device=device)[None, None, :]
        allowed = j <= i + (kv_len - q_len)[:, None, None]
        valid = valid & allowed[:, None, :, :]

    valid = valid.expand(B, Hq, Lq, k.shape[1])
    logits = logits.masked_fill(~valid, float("-inf"))
    # A row with no valid key, or whose logits are all -inf (a -inf modality_bias on
    # every modality it sees), gives lse = -inf and NaN through logsumexp: compute
    # such rows on zeros and zero their probabilities instead (output 0, zero grads).
    row_has_key = (~torch.isneginf(logits)).any(dim=-1)  # (B, Hq, Lq)
    logits = torch.where(row_has_key[..., None], logits, torch.zeros_like(logits))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None]) * row_has_key[..., None]
    lse = lse.masked_fill(~row_has_key, float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", probs, v)  # (B, Lq, Hq, Dv)
    if head_gate is not None:
        out = out * torch.tanh(head_gate.to(acc))[None, None, :, None]
    out = out.to(q.dtype)
    if return_lse:
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out


def gated_fusion_reference(
    features: torch.Tensor,
    gate_logits: torch.Tensor,
    present: Optional[torch.Tensor] = None,
    activation: str = "tanh",
    return_gates: bool = False,
    upcast: bool = True,
):
    """DESIGN.md 2.2: softmax over present modalities of gate_logits, weighting act(features)."""
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    if not upcast:
        acc = features.dtype
    f = features.to(acc)
    logits = gate_logits.to(acc)
    if present is not None:
        logits = logits.masked_fill(~present[..., None].bool(), float("-inf"))
    # A modality takes part at a unit where it is present and its logit is not -inf.
    takes_part = ~torch.isneginf(logits)
    any_present = takes_part.any(dim=0, keepdim=True)
    # A position with no modality taking part softmaxes over all -inf: replace by
    # zeros there and zero the gates afterwards, so it yields 0 and no NaN.
    gates = F.softmax(torch.where(any_present, logits, torch.zeros_like(logits)), dim=0)
    gates = gates * any_present
    # The features of a modality that takes no part never reach the result (nor its
    # gradients): a NaN there must not become 0 * NaN.
    f = torch.where(takes_part, f, torch.zeros_like(f))
    act = torch.tanh(f) if activation == "tanh" else f
    fused = (gates * act).sum(dim=0).to(features.dtype)
    if return_gates:
        return fused, gates.to(features.dtype)
    return fused
