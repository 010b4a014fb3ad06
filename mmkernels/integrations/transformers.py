"""Hugging Face transformers attention backend: `attn_implementation="mmkernels"`.

    import mmkernels.integrations.transformers as mmhf
    mmhf.register()                                   # once; idempotent
    model = AutoModel.from_pretrained(name, attn_implementation="mmkernels")
    # or, for a model already loaded:  mmhf.use_mmkernels(model)

Attention calls whose mask is "no mask" or "the first n keys of each sample"
(right padding: encoders, cross-attention over padded encoder states) and
causal self-attention without padding run on `cross_modal_attention` (one
segment, `kv_lengths` from the mask). A mask that is one key mask per sample
(left padding, holes), alone or under the causal triangle (padded causal text,
prefill and decoding over a cache), runs on the op's `kv_masks` where the
backend serves them (CPU today). Everything else (packed sequences, sliding
windows, dropout while training, soft-capping, attention sinks, position
biases, float masks) goes to transformers' own SDPA path, and `stats()` counts
each reason, so a model that never hits the fused path shows it.
`register(float_masks=True)` reads a float mask that only blocks keys (every
value 0, -inf or the dtype's min, as Mllama builds its cross-attention masks)
as the boolean mask it amounts to, and maps that as above.

The mask function registered with the attention ("mmkernels_mask") builds
transformers' SDPA mask and remembers, for the masks of plain causal or
bidirectional attention over a padding mask, the padding mask and whether the
mask is causal: the attention function then hands those to the kernel as they
are, with no pattern check and no device sync. Any other boolean mask (one the
model built or reshaped itself) is checked against the pattern the kernel will
apply before the kernel runs: exact results, at the cost of one comparison (and,
on a GPU, one device sync) per call; `register(check_masks=False)` skips it for
inputs known to be right-padded.
"""
from __future__ import annotations

import weakref
from collections import Counter
from typing import Dict, Optional, Tuple

import torch

import mmkernels
from mmkernels import backends
from mmkernels.nn.masks import attend_where_zero

NAME = "mmkernels"
_STATS: Counter = Counter()
_SETTINGS = {"check_masks": True, "backend": None, "float_masks": False}

# keyword arguments whose presence (with a value) changes the computation beyond what the op does
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "position_bias", "cu_seq_lens_q", "cu_seq_lens_k")


def stats() -> Dict[str, int]:
    """Calls served by mmkernels ("mmkernels") and by the SDPA fallback ("fallback: <why>")."""
    return dict(_STATS)


def reset_stats() -> None:
    _STATS.clear()


# id(mask) -> (weakref to the mask, padding mask (B, Lk) bool, causal): the masks mmkernels_mask built.
_KNOWN_MASKS: Dict[int, Tuple[weakref.ref, torch.Tensor, bool]] = {}


def mmkernels_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, local_size=None, allow_is_causal_skip=True,
                   allow_is_bidirectional_skip=False, use_vmap=False, device="cpu", **kwargs):
    """transformers' SDPA mask (masking_utils.sdpa_mask), remembered with what the kernel needs when
    it is plain causal (aligned bottom-right: the last query at the last key) or bidirectional
    attention over a 2D padding mask."""
    from transformers.masking_utils import (
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )

    mask_function = causal_mask_function if mask_function is None else mask_function
    mask = sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, allow_is_bidirectional_skip=allow_is_bidirectional_skip,
                     use_vmap=use_vmap, device=device, **kwargs)
    causal = mask_function is causal_mask_function
    plain = causal or mask_function is bidirectional_mask_function
    if (mask is None or not plain or attention_mask is None or use_vmap or local_size is not None
            or torch.compiler.is_compiling()):
        return mask
    if causal and q_offset + q_length != kv_offset + kv_length:  # e.g. a static cache longer than the keys
        return mask
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None or padding.dtype != torch.bool or tuple(padding.shape) != (batch_size, kv_length):
        return mask
    for key in [k for k, (ref, _, _) in _KNOWN_MASKS.items() if ref() is None]:
        del _KNOWN_MASKS[key]
    _KNOWN_MASKS[id(mask)] = (weakref.ref(mask), padding, causal)
    return mask


def _known_mask(mask: torch.Tensor, B: int, Lk: int):
    """(padding mask (B, Lk), causal) if mmkernels_mask built `mask` for this call's shape, else None."""
    entry = _KNOWN_MASKS.get(id(mask))
    if entry is None or entry[0]() is not mask or tuple(entry[1].shape) != (B, Lk):
        return None
    return entry[1], entry[2]


def _sdpa_fallback():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _bool_mask(mask: torch.Tensor) -> Tuple[Optional[torch.Tensor], str]:
    """`mask` as a boolean mask (True = attend) with the same result, else (None, why not). A float mask
    is read only under float_masks, and only if every value is 0 or blocks the key (-inf or the dtype's
    min: its weight underflows to exactly 0 while every score is below half the dtype's range), it needs
    no gradient, and every query row keeps a key (a fully blocked row is NaN or the mean of all values
    in SDPA, 0 in the kernel). Other masks come back as they are."""
    if mask.dtype == torch.bool or not mask.is_floating_point() or not _SETTINGS["float_masks"]:
        return mask, ""
    if mask.requires_grad:
        return None, f"{mask.dtype} mask that requires grad"
    attend = attend_where_zero(mask, dtype_min_blocks=True)
    if attend is None:
        return None, f"{mask.dtype} mask with values other than 0, -inf and the dtype's min"
    if not bool(attend.any(-1).all()):
        return None, f"{mask.dtype} mask with a fully masked query row"
    return attend, ""


def _lengths_from_mask(mask: torch.Tensor, B: int, Lk: int, check: bool) -> Tuple[Optional[torch.Tensor], str]:
    """kv_lengths (B, 1) if `mask` (bool, broadcastable to (B, H, Lq, Lk), True = attend) lets
    every query see exactly the first n_b keys of its sample; else (None, why not)."""
    if mask.dtype != torch.bool:
        return None, f"{mask.dtype} mask (only boolean masks are mapped)"
    if mask.dim() != 4 or mask.shape[-1] != Lk or mask.shape[0] not in (1, B):
        return None, f"mask of shape {tuple(mask.shape)}"
    first_row = mask[:, 0, 0, :]  # (B or 1, Lk)
    n = first_row.sum(-1)
    if check:
        prefix = torch.arange(Lk, device=mask.device)[None, :] < n[:, None]
        if not bool((mask == prefix[:, None, None, :]).all()):
            return None, "mask is not a right-padding (prefix) mask"
    return n.to(torch.int32).expand(B).reshape(B, 1).contiguous(), ""


def _key_mask_from_mask(mask: torch.Tensor, B: int, Lq: int, Lk: int) -> Tuple[Optional[torch.Tensor], bool, str]:
    """(kv_mask (B, Lk), causal, "") if `mask` (bool, (B or 1, H or 1, Lq, Lk)) is one key mask per
    sample, alone or under the causal triangle aligned bottom-right (key j seen by query i iff
    j <= i + Lk - Lq); else (None, False, why not)."""
    key_mask = mask[:, 0, -1, :].expand(B, Lk)  # the last query row sees every unmasked key in both
    plain = key_mask[:, None, None, :]
    if bool((mask == plain).all()):
        return key_mask.contiguous(), False, ""
    i = torch.arange(Lq, device=mask.device)[:, None]
    j = torch.arange(Lk, device=mask.device)[None, :]
    if bool((mask == (plain & (j <= i + (Lk - Lq)))).all()):
        return key_mask.contiguous(), True, ""
    return None, False, "mask is neither a key mask nor a causal key mask"


def _serves_key_masks(query: torch.Tensor, Dv: int) -> str:
    """Why the backend that would run a call with kv_masks cannot (or "")."""
    call = backends.Call("cross_modal_attention", query.device.type, query.dtype, 1, query.shape[-1], Dv,
                         key_masks=True)
    try:
        name = backends.select(call, _SETTINGS["backend"])
    except backends.BackendNotSupported as e:
        return str(e)
    return "" if name != "reference" else f"key masks on {query.device.type} have no fused kernel yet"


def mmkernels_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D);
    returns (attn_output (B, Lq, Hq, Dv), None)."""
    why = _why_not(module, query, key, value, dropout, kwargs)
    B, Lq, Lk = query.shape[0], query.shape[2], key.shape[2]
    kv_lengths = kv_masks = None
    causal = False
    if not why:
        if attention_mask is not None:
            known = _known_mask(attention_mask, B, Lk)
            if known is not None:  # built by mmkernels_mask: what the kernel needs, no check needed
                key_mask, causal = known
                causal = causal and Lq > 1
                why = _serves_key_masks(query, value.shape[-1])
                kv_masks = None if why else [key_mask]
            elif not _SETTINGS["check_masks"] and getattr(module, "is_causal", False):
                # a causal module's mask is never a plain prefix: only a verified mask may be mapped
                why = "mask on a causal module with check_masks=False"
            else:
                mask, why = _bool_mask(attention_mask)
                if not why:
                    kv_lengths, why = _lengths_from_mask(mask, B, Lk, _SETTINGS["check_masks"])
                if why == "mask is not a right-padding (prefix) mask":
                    key_mask, causal, why = _key_mask_from_mask(mask, B, Lq, Lk)
                    why = why or _serves_key_masks(query, value.shape[-1])
                    kv_masks = None if why else [key_mask]
        else:
            causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and Lq > 1
            if causal and Lq != Lk:
                why = f"causal attention with {Lq} queries over {Lk} keys (cache offsets)"
    if why:
        _STATS["fallback: " + why] += 1
        return _sdpa_fallback()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                is_causal=is_causal, **kwargs)
    _STATS[NAME] += 1
    # (B, H, L, D) -> (B, L, H, D) views: the op takes any strides with a unit last one.
    out = mmkernels.cross_modal_attention(
        query.transpose(1, 2), [key.transpose(1, 2)], [value.transpose(1, 2)], kv_lengths=kv_lengths,
        kv_masks=kv_masks, scale=scaling, causal=causal, backend=_SETTINGS["backend"],
    )
    return out, None


def _why_not(module, query, key, value, dropout, kwargs) -> str:
    if dropout and module.training:
        return "attention dropout while training"
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name} is set"
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads over {key.shape[1]} kv heads"
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        return "head dim not contiguous"
    return ""


def register(check_masks: bool = True, backend: Optional[str] = None, float_masks: bool = False) -> str:
    """Registers the "mmkernels" attention implementation (and its mask function, which builds
    SDPA's boolean masks and remembers what the kernel needs) with transformers and sets its
    options; returns the name. backend forces an mmkernels backend; float_masks maps float masks
    that only block keys (see _bool_mask)."""
    _SETTINGS.update(check_masks=check_masks, backend=backend, float_masks=float_masks)
    return _ensure_registered()


def _ensure_registered() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, mmkernels_attention_forward)
    AttentionMaskInterface.register(NAME, mmkernels_mask)
    return NAME


def use_mmkernels(model, **register_kwargs):
    """Switches a loaded transformers model to the mmkernels attention; returns the model.
    register_kwargs, if given, set the options as register() does; else they stay as they are."""
    if register_kwargs:
        register(**register_kwargs)
    else:
        _ensure_registered()
    model.set_attn_implementation(NAME)
    return model
