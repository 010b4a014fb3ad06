"""Model patches (Liger-Kernel style `apply_*`) for what transformers' attention interface cannot do.

    from mmkernels.integrations.patches import apply_idefics2_perceiver, apply_mllama_cross_attention
    model = apply_mllama_cross_attention(model)      # a loaded model; returns it
    print(stats())                                    # calls the patched modules ran on the op, and fallbacks

Each function replaces the forward of the matching module instances of a loaded model (their
parameters stay), is idempotent, works whether or not the model runs attn_implementation="mmkernels",
and raises TypeError when the model has no such module. A call the patch cannot run exactly (attention
dropout while training, output_attentions, a mask it cannot map) runs the module's own forward, and
stats() counts the reason.

- apply_idefics2_perceiver: Idefics2PerceiverAttention attends the latents over concat(context,
  latents). The patch projects keys and values of the context and of the latents separately and runs
  the op on the two segments (no concatenation), the context's padding as kv_masks[0].
- apply_mllama_cross_attention: MllamaCrossAttentionDecoderLayer's cross-attention gets a float mask
  (0 / finfo.min) that the interface maps only when it is one key mask per sample. The patch reads it
  per sample: every query row sees either the sample's key mask (its real tiles) or every key (text
  before the image: a row with no tile, which _prepare_cross_attention_mask turns into all zeros). The
  layer does NOT zero the attention output of those rows (full_text_row_masked_out_mask multiplies
  the MLP branch only), so they are computed exactly: one more op call without masks over the first
  rows up to the last such row. The tanh gate goes into the op's head_gate when o_proj has no bias
  and the gate is a scalar (tanh(g) * o_proj(x) == o_proj(tanh(g) * x)), else it stays outside.
"""
from __future__ import annotations

import types
from collections import Counter
from typing import Dict, Optional, Tuple

import torch

import mmkernels
from mmkernels.integrations import transformers as mmhf
from mmkernels.nn.masks import attend_where_zero

_STATS: Counter = Counter()
IDEFICS2 = "idefics2_perceiver"
MLLAMA = "mllama_cross_attention"


def stats() -> Dict[str, int]:
    """Calls the patched modules ran on the op ("<patch>") and on their own forward ("fallback: <patch>: <why>")."""
    return dict(_STATS)


def reset_stats() -> None:
    _STATS.clear()


def _patch(model, cls, new_forward, what: str):
    """Replaces the forward of every `cls` instance in `model` (once); returns the model."""
    found = [m for m in model.modules() if isinstance(m, cls)]
    if not found:
        raise TypeError(f"{what} expects a model with {cls.__name__} modules (transformers.{cls.__module__}); "
                        f"{type(model).__name__} has none")
    for module in found:
        if getattr(module.__dict__.get("forward"), "__func__", None) is not new_forward:
            module.forward = types.MethodType(new_forward, module)
    return model


def _fallback(patch: str, why: str, module, *args, **kwargs):
    _STATS[f"fallback: {patch}: {why}"] += 1
    return type(module).forward(module, *args, **kwargs)


def _why_not(module, dropout: float, kwargs) -> str:
    if dropout and module.training:
        return "attention dropout while training"
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    return ""


def _attend(mask: torch.Tensor) -> Tuple[Optional[torch.Tensor], str]:
    """The boolean mask (True = attend) a boolean or float (0 / -inf / finfo.min) mask amounts to."""
    if mask.dtype == torch.bool:
        return mask, ""
    if not mask.is_floating_point():
        return mask != 0, ""  # a 0/1 padding mask (flash attention's 2D mask)
    if mask.requires_grad:
        return None, "mask that requires grad"
    attend = attend_where_zero(mask, dtype_min_blocks=True)
    if attend is None:
        return None, "float mask with values other than 0, -inf and the dtype's min"
    return attend, ""


def _key_mask_backend(query: torch.Tensor, Dv: int) -> str:
    """Why the op's key masks would only run on the reference here (the interface keeps SDPA then)."""
    return mmhf._serves_key_masks(query, Dv)


# --- Idefics2 perceiver resampler ------------------------------------------------------------------

def _context_mask(attention_mask, B: int, Lc: int, Lq: int) -> Tuple[Optional[torch.Tensor], str]:
    """The context's key mask (B, Lc) (None: no padding) from the mask over concat(context, latents)
    that Idefics2PerceiverResampler builds (4D bidirectional, or the 2D padding mask)."""
    if attention_mask is None:
        return None, ""
    attend, why = _attend(attention_mask)
    if why:
        return None, why
    if attend.dim() == 4 and attend.shape[-2:] == (Lq, Lc + Lq):
        if not bool((attend == attend[:, :1, :1, :]).all()):  # one key mask per sample, for every head and row
            return None, "mask is not one key mask per sample"
        attend = attend[:, 0, 0, :]
    if attend.dim() != 2 or attend.shape[-1] != Lc + Lq or attend.shape[0] not in (1, B):
        return None, f"mask of shape {tuple(attention_mask.shape)}"
    attend = attend.expand(B, Lc + Lq)
    if not bool(attend[:, Lc:].all()):
        return None, "mask hides latents"
    context = attend[:, :Lc]
    return (None if bool(context.all()) else context.contiguous()), ""


def _idefics2_perceiver_forward(self, latents, context, attention_mask=None, position_ids=None, cache=None,
                                **kwargs):
    cache = kwargs.pop("past_key_values", cache)
    B, Lq, _ = latents.shape
    Lc = context.shape[1]
    why = _why_not(self, self.attention_dropout, kwargs)
    if not why and getattr(self, "cache", cache) is not None:
        why = "a cache"
    kv_mask = None
    if not why:
        kv_mask, why = _context_mask(attention_mask, B, Lc, Lq)
    H, Hkv, D = self.num_heads, self.num_key_value_heads, self.head_dim
    queries = self.q_proj(latents).view(B, Lq, H, D)
    if not why and kv_mask is not None:
        why = _key_mask_backend(queries, D)
    if why:
        return _fallback(IDEFICS2, why, self, latents, context, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, **kwargs)
    # k_proj(concat(context, latents)) == concat(k_proj(context), k_proj(latents)): two segments, exactly
    keys = [self.k_proj(x).view(B, x.shape[1], Hkv, D) for x in (context, latents)]
    values = [self.v_proj(x).view(B, x.shape[1], Hkv, D) for x in (context, latents)]
    out = mmkernels.cross_modal_attention(queries, keys, values, scale=self.scaling,
                                          kv_masks=None if kv_mask is None else [kv_mask, None],
                                          backend=mmhf._SETTINGS["backend"])
    _STATS[IDEFICS2] += 1
    return self.o_proj(out.reshape(B, Lq, H * D)), None


def apply_idefics2_perceiver(model):
    """Runs every Idefics2PerceiverAttention of `model` on the op with two segments (context, latents)."""
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverAttention

    return _patch(model, Idefics2PerceiverAttention, _idefics2_perceiver_forward, "apply_idefics2_perceiver")


# --- Mllama text cross-attention layers ------------------------------------------------------------

def _tile_masks(mask, B: int, Lq: int, Lk: int):
    """(key_mask (B, Lk) or None, rows (B, Lq) that see every key where that differs, or None, why) from
    the layer's cross-attention mask (B or 1, 1, Lq, Lk): every row of a sample must see either the
    sample's key mask or every key, and keep a key."""
    if mask is None:
        return None, None, ""
    attend, why = _attend(mask)
    if why:
        return None, None, why
    if attend.dim() != 4 or attend.shape[1] != 1 or attend.shape[-2:] != (Lq, Lk) or attend.shape[0] not in (1, B):
        return None, None, f"mask of shape {tuple(mask.shape)}"
    attend = attend[:, 0].expand(B, Lq, Lk)
    if not bool(attend.any(-1).all()):
        return None, None, "mask with a fully masked query row"
    key_mask = attend.all(1)  # the keys every row sees: the sample's tiles, or every key
    sees_all = attend.all(-1)
    if not bool((attend == (key_mask[:, None, :] | sees_all[..., None])).all()):
        return None, None, "rows of a sample see different tiles"
    if bool(key_mask.all()):
        return None, None, ""
    rows = sees_all & ~key_mask.all(-1, keepdim=True)
    return key_mask.contiguous(), (rows if bool(rows.any()) else None), ""


def _mllama_cross_attention(attn, hidden_states, cross_attention_states, cache, mask, gate, kwargs):
    """tanh(gate) * attn(hidden_states) on the op, or (None, why)."""
    why = _why_not(attn, attn.dropout, kwargs)
    if why:
        return None, why
    B, Lq, _ = hidden_states.shape
    H, Hkv, D = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    if cross_attention_states is not None:
        Lk = cross_attention_states[..., 0].numel() // B  # (B * images * tiles, patches, hidden) in Mllama
    elif cache is not None:
        Lk = cache.layers[attn.layer_idx].keys.shape[-2]
    else:
        return None, "no cross-attention states"
    key_mask, rows, why = _tile_masks(mask, B, Lq, Lk)
    q = attn.q_norm(attn.q_proj(hidden_states).view(B, Lq, H, D))  # RMSNorm over D: any layout
    if not why and key_mask is not None:
        why = _key_mask_backend(q, D)
    if why:
        return None, why
    if cross_attention_states is not None:  # as MllamaTextCrossAttention computes and caches them
        k = attn.k_proj(cross_attention_states).view(B, -1, Hkv, D).transpose(1, 2)
        v = attn.v_proj(cross_attention_states).view(B, -1, Hkv, D).transpose(1, 2)
        k = attn.k_norm(k)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
    else:
        k, v = cache.layers[attn.layer_idx].keys, cache.layers[attn.layer_idx].values
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Lk, Hkv, D) views
    fuse = attn.o_proj.bias is None and gate.numel() == 1
    head_gate = gate.reshape(()).expand(H) if fuse else None
    run = dict(scale=attn.scaling, head_gate=head_gate, backend=mmhf._SETTINGS["backend"])
    out = mmkernels.cross_modal_attention(q, [k], [v], kv_masks=None if key_mask is None else [key_mask], **run)
    if rows is not None:  # text rows before the image: they see every tile, padding tiles included
        n = int(rows.any(0).nonzero().max()) + 1
        every = mmkernels.cross_modal_attention(q[:, :n], [k], [v], **run)
        out = torch.cat([torch.where(rows[:, :n, None, None], every, out[:, :n]), out[:, n:]], dim=1)
    out = attn.o_proj(out.reshape(B, Lq, H * D))
    return (out if fuse else gate.tanh() * out), ""


def _mllama_layer_forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
                          full_text_row_masked_out_mask, position_ids=None, cache=None, use_cache=False,
                          position_embeddings=None, **kwargs):
    cache = kwargs.pop("past_key_values", cache)
    residual = hidden_states
    gated, why = _mllama_cross_attention(self.cross_attn, self.input_layernorm(hidden_states),
                                         cross_attention_states, cache, cross_attention_mask,
                                         self.cross_attn_attn_gate, kwargs)
    if why:
        return _fallback(MLLAMA, why, self, hidden_states, cross_attention_states, cross_attention_mask,
                         attention_mask, full_text_row_masked_out_mask, position_ids=position_ids, cache=cache,
                         use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    _STATS[MLLAMA] += 1
    hidden_states = residual + gated  # the rest as MllamaCrossAttentionDecoderLayer.forward
    residual = hidden_states
    hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    if full_text_row_masked_out_mask is not None:
        hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
    return residual + self.cross_attn_mlp_gate.tanh() * hidden_states


def apply_mllama_cross_attention(model):
    """Runs the cross-attention of every MllamaCrossAttentionDecoderLayer of `model` on the op."""
    from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

    return _patch(model, MllamaCrossAttentionDecoderLayer, _mllama_layer_forward, "apply_mllama_cross_attention")
