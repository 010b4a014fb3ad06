"""Drop-in `torch.nn.MultiheadAttention` on `mmkernels.cross_modal_attention`.

    mha = mmkernels.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)  # torch's arguments
    out, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    model = mmkernels.nn.replace_multihead_attention(model)  # every nn.MultiheadAttention, in place

A subclass of torch's module: the same parameters, names, initialisation and
state_dict. A call runs fused when it asks for no weights (need_weights=False),
has no attention dropout while training, and its masks are ones the op applies
exactly: a key_padding_mask that is bool or a float of only 0 and -inf (any
pattern: left padding, holes), and no attn_mask or the square causal triangle
(is_causal=True, or a bool/float (L, L) or (N*num_heads, L, L) mask equal to
it). bias_k/bias_v and add_zero_attn become extra one-key segments of the op
(no concatenated copy; not with causal attention). Everything else goes to
torch's forward, and `stats()` counts each call and why it fell back.

A query row with no valid key (every key masked) gives 0 attention (out_proj's
bias after the projection) and zero gradients, as torch's need_weights=False
path does on CPU (its need_weights=True path gives NaN there).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkernels import backends
from mmkernels.nn.masks import attend_where_zero
from mmkernels.ops import cross_modal_attention

FUSED = "fused"
_STATS: Counter = Counter()


def stats() -> Dict[str, int]:
    """Calls run on the op ("fused") and by torch's forward ("fallback: <why>")."""
    return dict(_STATS)


def reset_stats() -> None:
    _STATS.clear()


def _attend_mask(key_padding_mask: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], str]:
    """torch's key_padding_mask (bool True = ignore, or float added to the logits) as the op's
    key mask (True = attend), or (None, why not)."""
    if key_padding_mask is None:
        return None, ""
    if key_padding_mask.dtype == torch.bool:
        return ~key_padding_mask, ""
    if not key_padding_mask.is_floating_point():
        return None, f"{key_padding_mask.dtype} key_padding_mask"
    if key_padding_mask.requires_grad:
        return None, "key_padding_mask requires grad"
    attend = attend_where_zero(key_padding_mask, dtype_min_blocks=False)
    if attend is None:
        return None, "float key_padding_mask with values other than 0 and -inf"
    return attend, ""


def _is_causal_triangle(mask: torch.Tensor, L: int, rows: int) -> bool:
    """Whether torch's attn_mask (bool True = masked, or float added) is the causal triangle."""
    if tuple(mask.shape) not in ((L, L), (rows, L, L)) or mask.requires_grad:
        return False
    above = torch.ones(L, L, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool((mask == above).all())
    if not mask.is_floating_point():
        return False
    return bool(torch.where(above, mask == float("-inf"), mask == 0).all())


class MultiheadAttention(nn.MultiheadAttention):
    """`torch.nn.MultiheadAttention` (same arguments, parameters and results) whose calls run on
    `cross_modal_attention` where they can; `backend` forces an mmkernels backend."""

    backend: Optional[str] = None  # a class default, for modules swapped in by replace_multihead_attention

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
                         batch_first, device, dtype)
        self.backend = backend

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        why = self._why_not(query, key, value, key_padding_mask, need_weights)
        if not why:
            attend, causal, why = self._plan(query, key, key_padding_mask, attn_mask, is_causal)
        if why:
            _STATS["fallback: " + why] += 1
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        _STATS[FUSED] += 1
        return self._fused(query, key, value, attend, causal), None

    def _why_not(self, query, key, value, key_padding_mask, need_weights) -> str:
        """Why the call goes to torch, from what is known without reading tensors (or "")."""
        if need_weights:
            return "need_weights=True"
        if self.training and self.dropout > 0:
            return "attention dropout while training"
        tensors = [t for t in (query, key, value, key_padding_mask) if t is not None]
        if any(t.is_nested for t in tensors):
            return "nested tensor input"
        if torch.overrides.has_torch_function(tensors):
            return "tensor subclass input"
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return "input shapes torch does not accept"  # torch raises its error
        if batched and self.batch_first:
            (B, L, E), (Bk, S, Ek), (Bv, Sv, Ev) = query.shape, key.shape, value.shape
        elif batched:
            (L, B, E), (S, Bk, Ek), (Sv, Bv, Ev) = query.shape, key.shape, value.shape
        else:
            (L, E), (S, Ek), (Sv, Ev) = query.shape, key.shape, value.shape
            B = Bk = Bv = 1
        if (E, Ek, Ev) != (self.embed_dim, self.kdim, self.vdim) or (B, S) != (Bk, Sv) or Bv != B:
            return "input shapes torch does not accept"
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != ((B, S) if batched else (S,)):
            return "key_padding_mask shape torch does not accept"
        if B * L * S == 0:
            return "empty input"
        if not (query.dtype == key.dtype == value.dtype) or query.dtype not in backends.FLOAT_DTYPES + (torch.float64,):
            return f"inputs of dtypes {query.dtype}, {key.dtype}, {value.dtype}"
        return ""

    def _plan(self, query, key, key_padding_mask, attn_mask, is_causal) -> Tuple[Optional[torch.Tensor], bool, str]:
        """(key mask or None, causal, "") for the op, or (None, False, why the call goes to torch)."""
        batched = query.dim() == 3
        L = query.shape[1 if batched and self.batch_first else 0]
        S = key.shape[1 if batched and self.batch_first else 0]
        B = query.shape[0 if self.batch_first else 1] if batched else 1
        attend, why = _attend_mask(key_padding_mask)
        if why:
            return None, False, why
        causal = False
        if is_causal and attn_mask is None:
            return None, False, "is_causal=True without attn_mask"  # torch raises its error
        if attn_mask is not None:
            if L != S:
                return None, False, f"attn_mask with {L} queries over {S} keys"
            if is_causal and key_padding_mask is None:
                causal = True  # torch trusts the hint here and never reads the mask
            elif _is_causal_triangle(attn_mask, L, B * self.num_heads):
                causal = True
            else:
                return None, False, "attn_mask that is not the causal triangle"
        segments = 1 + (self.bias_k is not None) + bool(self.add_zero_attn)
        if causal and segments > 1:
            return None, False, "causal attention with bias_k/bias_v or add_zero_attn"
        head_dim = self.embed_dim // self.num_heads
        call = backends.Call("cross_modal_attention", query.device.type, query.dtype, segments, head_dim, head_dim,
                             key_masks=attend is not None)
        try:
            name = backends.select(call, self.backend)
        except backends.BackendNotSupported as e:
            return None, False, str(e)
        if name == "reference" and not (self.backend or os.environ.get("MMKERNELS_BACKEND")):
            masks = "key masks " if attend is not None else ""
            return None, False, f"no fused kernel for {masks}{query.dtype} on {query.device.type} (head dim {head_dim})"
        return attend, causal, ""

    def _project(self, query, key, value, self_attn: bool, kv_same: bool) -> List[torch.Tensor]:
        """q, k, v as torch's in-projection computes them (one product for self-attention)."""
        E = self.embed_dim
        bias = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
            return [F.linear(query, self.q_proj_weight, b_q), F.linear(key, self.k_proj_weight, b_k),
                    F.linear(value, self.v_proj_weight, b_v)]
        if self_attn:
            return list(F.linear(query, self.in_proj_weight, bias).chunk(3, -1))
        w_q, w_kv = self.in_proj_weight.split([E, 2 * E])
        b_q, b_kv = (None, None) if bias is None else bias.split([E, 2 * E])
        q = F.linear(query, w_q, b_q)
        if kv_same:
            return [q, *F.linear(key, w_kv, b_kv).chunk(2, -1)]
        (w_k, w_v), (b_k, b_v) = w_kv.chunk(2), ((None, None) if b_kv is None else b_kv.chunk(2))
        return [q, F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)]

    def _fused(self, query, key, value, attend, causal) -> torch.Tensor:
        self_attn, kv_same = query is key and key is value, key is value
        batched = query.dim() == 3
        seq_first = batched and not self.batch_first
        if not batched:  # one sample, batch first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            attend = None if attend is None else attend.unsqueeze(0)
        H, hd = self.num_heads, self.embed_dim // self.num_heads

        def heads(x):  # (B, L, E) or (L, B, E) -> (B, L, H, hd), a view
            x = x.unflatten(-1, (H, hd))
            return x.transpose(0, 1) if seq_first else x

        q, k, v = (heads(t) for t in self._project(query, key, value, self_attn, kv_same))
        B, L = q.shape[:2]
        keys, values = [k], [v]
        if self.bias_k is not None:  # torch appends one key/value per sample: one more segment
            keys.append(self.bias_k.view(1, 1, H, hd).expand(B, 1, H, hd))
            values.append(self.bias_v.view(1, 1, H, hd).expand(B, 1, H, hd))
        if self.add_zero_attn:  # and a zero key/value after it
            keys.append(q.new_zeros(1, 1, H, hd).expand(B, 1, H, hd))
            values.append(q.new_zeros(1, 1, H, hd).expand(B, 1, H, hd))
        kv_masks = None if attend is None else [attend] + [None] * (len(keys) - 1)
        out = cross_modal_attention(q, keys, values, kv_masks=kv_masks, causal=causal, backend=self.backend)
        if seq_first:
            out = self.out_proj(out.transpose(0, 1).reshape(L, B, self.embed_dim))
        else:
            out = self.out_proj(out.reshape(B, L, self.embed_dim))
        return out if batched else out.squeeze(0)


def replace_multihead_attention(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Makes every `torch.nn.MultiheadAttention` in `model` (itself included; not subclasses, whose
    forward may differ) an mmkernels `MultiheadAttention`, in place; returns the model. The modules
    keep their parameters (the same tensors: optimizers and tied weights stay valid), device, dtype,
    training mode and hooks. Note that nn.TransformerEncoderLayer's inference fast path (eval, no
    grad) never calls self_attn.forward and stays torch's."""
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            module.backend = backend
    return model
