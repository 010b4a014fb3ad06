"""mmkernels.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict:
outputs and gradients (inputs and every parameter) equal, the fused op serving the calls it can
(stats()), torch's forward (and its results) for the others, with the reason recorded."""
import copy
import inspect

import pytest
import torch
import torch.nn as nn

import mmkernels.nn as mnn
from mmkernels.nn import multihead_attention as mha

E, H = 16, 4
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _close(actual, expected, dtype, what="output"):
    """TOL on O(1) values; absolute tolerance relative to the largest value (parameter gradients
    are fp32 sums of a few hundred products with magnitudes up to ~10)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"],
                               msg=lambda m: f"{what}: {m}")
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


@pytest.fixture(autouse=True)
def _fresh_stats():
    mha.reset_stats()
    yield


def _pair(dtype=torch.float64, seed=0, **kwargs):
    """(torch module, mmkernels module) with the same random parameters (biases included)."""
    g = torch.Generator().manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    ours = mnn.MultiheadAttention(E, H, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _randn(g, dtype, *shape):
    return torch.randn(*shape, generator=g, dtype=dtype)


def _run(mod, leaves, index, row_weight=None, seed=1, **kwargs):
    """out and the gradients of sum(out * w) w.r.t. the leaves and every parameter; index picks
    (query, key, value) among the leaves, so that self-attention passes one tensor three times."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out, weights = mod(*(leaves[i] for i in index), **kwargs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    if row_weight is not None:
        w = w * row_weight
    grads = torch.autograd.grad((out * w).sum(), leaves + [p for _, p in mod.named_parameters()])
    return out, weights, grads


def _assert_same(ref, ours, leaves, index, dtype, ref_kwargs=None, row_weight=None, **kwargs):
    a, _, ga = _run(ref, leaves, index, row_weight, **(ref_kwargs or kwargs))
    b, wb, gb = _run(ours, leaves, index, row_weight, **kwargs)
    assert wb is None and b.shape == a.shape and b.dtype == a.dtype
    keep = torch.ones_like(a, dtype=torch.bool) if row_weight is None else row_weight.expand_as(a).bool()
    _close(b[keep], a[keep], dtype)
    names = [f"input {i}" for i in range(len(leaves))] + [n for n, _ in ours.named_parameters()]
    assert len(ga) == len(gb) == len(names)
    for name, x, y in zip(names, ga, gb):
        _close(y, x, dtype, f"gradient of {name}")
    return b, gb


def _seq(x, batch_first):
    """(B, L, E) -> the module's layout."""
    return x if batch_first else x.transpose(0, 1).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention(dtype, batch_first):
    ref, ours = _pair(dtype, batch_first=batch_first)
    x = _seq(_randn(torch.Generator().manual_seed(2), dtype, 3, 9, E), batch_first)
    _assert_same(ref, ours, [x], (0, 0, 0), dtype, need_weights=False)
    assert mha.stats() == {"fused": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["kv_same", "kv_separate", "kdim_vdim", "bias_kv_zero_attn"])
def test_cross_attention(dtype, batch_first, kind):
    extra = {"kdim_vdim": dict(kdim=6, vdim=10), "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True)}
    kw = extra.get(kind, {})
    ref, ours = _pair(dtype, batch_first=batch_first, **kw)
    g = torch.Generator().manual_seed(3)
    q = _seq(_randn(g, dtype, 2, 7, E), batch_first)
    k = _seq(_randn(g, dtype, 2, 5, kw.get("kdim", E)), batch_first)
    v = _seq(_randn(g, dtype, 2, 5, kw.get("vdim", E)), batch_first)
    leaves, index = ([q, k], (0, 1, 1)) if kind == "kv_same" else ([q, k, v], (0, 1, 2))
    _assert_same(ref, ours, leaves, index, dtype, need_weights=False)
    assert mha.stats() == {"fused": 1}


def _kpm():
    """(B=4, S=6) key_padding_mask, True = ignore: none, left padding, holes, every key."""
    return torch.tensor([[0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1]]).bool()


def _safe_reference_mask(ignore, L, causal):
    """Rows where no key is valid are NaN in torch's need_weights=True path (and in the SDPA path
    of some torch versions, with NaN parameter gradients): this reference gets a (B*H, L, S) float
    mask that lets those rows see every key, and the rows are left out of the loss. Returns
    (mask, valid rows (B, L))."""
    B, S = ignore.shape
    attend = (~ignore)[:, None, :].expand(B, L, S)
    if causal:
        attend = attend & torch.ones(L, S, dtype=torch.bool).tril()
    valid = attend.any(-1)
    attend = attend | ~valid[..., None]
    mask = torch.zeros(B, L, S, dtype=torch.float64).masked_fill(~attend, float("-inf"))
    return mask.repeat_interleave(H, 0), valid


def _row_weight(valid, batch_first, dtype):
    w = valid.to(dtype)[..., None]  # (B, L, 1)
    return w if batch_first else w.transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
@pytest.mark.parametrize("attention", ["self", "cross"])
def test_key_padding_mask_left_padding_and_holes(dtype, batch_first, mask_dtype, attention):
    ref, ours = _pair(dtype, batch_first=batch_first)
    g = torch.Generator().manual_seed(4)
    ignore = _kpm()
    kpm = ignore if mask_dtype == "bool" else torch.zeros(ignore.shape, dtype=dtype).masked_fill(ignore, float("-inf"))
    L = 6 if attention == "self" else 3
    q = _seq(_randn(g, dtype, 4, L, E), batch_first)
    kv = _seq(_randn(g, dtype, 4, 6, E), batch_first)
    leaves, index = ([q], (0, 0, 0)) if attention == "self" else ([q, kv], (0, 1, 1))
    ref_mask, valid = _safe_reference_mask(ignore, L, causal=False)
    out, grads = _assert_same(ref, ours, leaves, index, dtype, row_weight=_row_weight(valid, batch_first, dtype),
                              ref_kwargs=dict(attn_mask=ref_mask.to(dtype), need_weights=False),
                              key_padding_mask=kpm, need_weights=False)
    assert mha.stats() == {"fused": 1}
    # the sample with every key masked: attention 0 (out_proj's bias), no NaN anywhere
    out_b = out if batch_first else out.transpose(0, 1)
    torch.testing.assert_close(out_b[3], ours.out_proj.bias.detach().expand(L, E), atol=0, rtol=0)
    assert not out.isnan().any() and not any(gr.isnan().any() for gr in grads)
    _same_as_torchs_sdpa_where_finite(ref, ours, leaves, index, dtype, key_padding_mask=kpm, need_weights=False)
    weights_path = ref(*(leaves[i] for i in index), key_padding_mask=kpm, need_weights=True)[0]
    assert (weights_path if batch_first else weights_path.transpose(0, 1))[3].isnan().all()


def _same_as_torchs_sdpa_where_finite(ref, ours, leaves, index, dtype, **kwargs):
    """torch's SDPA path (need_weights=False) gives 0 too for rows with no valid key where it gives
    no NaN (this torch on CPU): then everything, those rows included, equals torch with its own masks."""
    with torch.no_grad():
        finite = not ref(*(leaves[i] for i in index), **kwargs)[0].isnan().any()
    if finite:
        _assert_same(ref, ours, leaves, index, dtype, **kwargs)


def _causal_masks(L, dtype):
    return {
        "is_causal": (nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype), True),
        "float_triangle": (nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype), False),
        "bool_triangle": (torch.ones(L, L, dtype=torch.bool).triu(1), False),
        "bool_triangle_3d": (torch.ones(3 * H, L, L, dtype=torch.bool).triu(1), False),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("form", ["is_causal", "float_triangle", "bool_triangle", "bool_triangle_3d"])
def test_causal(dtype, batch_first, form):
    ref, ours = _pair(dtype, batch_first=batch_first)
    x = _seq(_randn(torch.Generator().manual_seed(5), dtype, 3, 8, E), batch_first)
    mask, is_causal = _causal_masks(8, dtype)[form]
    out, _ = _assert_same(ref, ours, [x], (0, 0, 0), dtype, attn_mask=mask, is_causal=is_causal, need_weights=False)
    assert mha.stats() == {"fused": 1}
    # and it is causal: the first output row does not depend on the later tokens
    full, _ = ours(x, x, x, need_weights=False)
    assert not torch.allclose(out, full)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [True, False])
def test_causal_with_left_padding(dtype, is_causal):
    """Causal triangle and a key_padding_mask: the left-padded rows see no key."""
    ref, ours = _pair(dtype, batch_first=True)
    ignore = _kpm()
    x = _randn(torch.Generator().manual_seed(6), dtype, 4, 6, E)
    ref_mask, valid = _safe_reference_mask(ignore, 6, causal=True)
    out, grads = _assert_same(ref, ours, [x], (0, 0, 0), dtype, row_weight=_row_weight(valid, True, dtype),
                              ref_kwargs=dict(attn_mask=ref_mask.to(dtype), need_weights=False),
                              key_padding_mask=ignore, attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1),
                              is_causal=is_causal, need_weights=False)
    assert mha.stats() == {"fused": 1}
    assert not valid[1, :3].any() and valid[1, 3:].all()
    torch.testing.assert_close(out[1, :3], ours.out_proj.bias.detach().expand(3, E), atol=0, rtol=0)
    assert not any(gr.isnan().any() for gr in grads)
    _same_as_torchs_sdpa_where_finite(ref, ours, [x], (0, 0, 0), dtype, key_padding_mask=ignore, need_weights=False,
                                      attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1), is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched(dtype):
    ref, ours = _pair(dtype, batch_first=True)  # batch_first is ignored for 2-D inputs
    g = torch.Generator().manual_seed(7)
    x, kv = _randn(g, dtype, 5, E), _randn(g, dtype, 6, E)
    out, _ = _assert_same(ref, ours, [x], (0, 0, 0), dtype, need_weights=False)
    assert out.shape == (5, E)
    kpm = torch.tensor([True, False, False, True, False, False])
    out, _ = _assert_same(ref, ours, [x, kv], (0, 1, 1), dtype, key_padding_mask=kpm, need_weights=False)
    assert out.shape == (5, E)
    assert mha.stats() == {"fused": 2}


@pytest.mark.parametrize("kwargs", [{}, dict(kdim=6, vdim=10), dict(add_bias_kv=True), dict(bias=False)],
                         ids=["packed", "separate", "bias_kv", "no_bias"])
def test_state_dict_round_trip_and_same_init(kwargs):
    torch.manual_seed(8)
    ref = nn.MultiheadAttention(E, H, **kwargs)
    torch.manual_seed(8)
    ours = mnn.MultiheadAttention(E, H, **kwargs)
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    assert isinstance(ours, nn.MultiheadAttention) and type(ours.out_proj) is type(ref.out_proj)
    other = nn.MultiheadAttention(E, H, **kwargs)
    other.load_state_dict(b)  # ours -> torch, strict
    ours2 = mnn.MultiheadAttention(E, H, **kwargs)
    ours2.load_state_dict(other.state_dict())  # torch -> ours, strict
    assert all(torch.equal(v, ours2.state_dict()[k]) for k, v in a.items())


def test_constructor_signature_is_torchs():
    theirs = list(inspect.signature(nn.MultiheadAttention.__init__).parameters.values())
    ours = list(inspect.signature(mnn.MultiheadAttention.__init__).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(theirs)]] == [(p.name, p.default) for p in theirs]
    assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(theirs):])


class _TinyModel(nn.Module):
    """Self-attention, cross-attention over a memory, a TransformerEncoderLayer (need_weights=False)."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(E, H, batch_first=True, kdim=6, vdim=6)
        self.layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x, memory, kpm):
        x = x + self.self_attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        x = x + self.cross_attn(x, memory, memory, need_weights=False)[0]
        x = self.layer(x, src_key_padding_mask=kpm, src_mask=torch.ones(6, 6, dtype=torch.bool).triu(1))
        return self.head(x)


def test_replace_multihead_attention():
    torch.manual_seed(9)
    ref = _TinyModel().double().train()
    model = copy.deepcopy(ref)
    params_before = {n: p for n, p in model.named_parameters()}
    assert mnn.replace_multihead_attention(model) is model
    swapped = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(swapped) == 3 and all(type(m) is mnn.MultiheadAttention for m in swapped)
    assert all(params_before[n] is p for n, p in model.named_parameters())  # the same tensors
    assert model.training and all(p.dtype == torch.float64 for p in model.parameters())
    g = torch.Generator().manual_seed(10)
    x, memory = _randn(g, torch.float64, 3, 6, E), _randn(g, torch.float64, 3, 4, 6)
    kpm = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]).bool()
    outs, grads = [], []
    for m in (ref, model):
        xs = [x.clone().requires_grad_(), memory.clone().requires_grad_()]
        out = m(*xs, kpm)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), xs + list(m.parameters())))
    torch.testing.assert_close(outs[1], outs[0], **TOL[torch.float64])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **TOL[torch.float64])
    assert mha.stats() == {"fused": 3}  # the layer's float masks (canonicalised by torch) map too


def test_fallback_need_weights_returns_torchs_weights():
    ref, ours = _pair(torch.float64)
    x = _randn(torch.Generator().manual_seed(11), torch.float64, 5, 2, E)
    for avg in (True, False):
        a, wa, ga = _run(ref, [x], (0, 0, 0), average_attn_weights=avg)
        b, wb, gb = _run(ours, [x], (0, 0, 0), average_attn_weights=avg)
        torch.testing.assert_close(b, a, atol=0, rtol=0)
        torch.testing.assert_close(wb, wa, atol=0, rtol=0)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(v, u, atol=0, rtol=0)
    assert mha.stats() == {"fallback: need_weights=True": 2}


@pytest.mark.parametrize("case", ["random_mask", "non_square_causal", "soft_kpm", "int_kpm_raises"])
def test_fallback_masks(case):
    ref, ours = _pair(torch.float64, batch_first=True)
    g = torch.Generator().manual_seed(12)
    q, kv = _randn(g, torch.float64, 2, 4, E), _randn(g, torch.float64, 2, 6, E)
    kwargs = dict(need_weights=False)
    if case == "random_mask":
        q = _randn(g, torch.float64, 2, 6, E)
        kwargs["attn_mask"] = torch.rand(6, 6, generator=g) < 0.3
        why = "attn_mask that is not the causal triangle"
    elif case == "non_square_causal":
        kwargs.update(attn_mask=torch.ones(4, 6, dtype=torch.bool).triu(1), is_causal=True)
        why = "attn_mask with 4 queries over 6 keys"
    elif case == "soft_kpm":
        kwargs["key_padding_mask"] = torch.rand(2, 6, generator=g, dtype=torch.float64) - 1.0
        why = "float key_padding_mask with values other than 0 and -inf"
    else:
        kwargs["key_padding_mask"] = torch.zeros(2, 6, dtype=torch.int64)
        with pytest.raises(AssertionError, match="only bool and floating types"):
            ours(q, kv, kv, **kwargs)
        assert mha.stats() == {"fallback: torch.int64 key_padding_mask": 1}
        return
    a, _, ga = _run(ref, [q, kv], (0, 1, 1), **kwargs)
    b, _, gb = _run(ours, [q, kv], (0, 1, 1), **kwargs)
    torch.testing.assert_close(b, a, atol=0, rtol=0)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, atol=0, rtol=0)
    assert mha.stats() == {"fallback: " + why: 1}


def test_fallback_dropout_while_training_and_fused_in_eval():
    ref, ours = _pair(torch.float64, dropout=0.5)
    x = _randn(torch.Generator().manual_seed(13), torch.float64, 5, 2, E)
    torch.manual_seed(14)
    a, _, ga = _run(ref, [x], (0, 0, 0), need_weights=False)
    torch.manual_seed(14)
    b, _, gb = _run(ours, [x], (0, 0, 0), need_weights=False)
    torch.testing.assert_close(b, a, atol=0, rtol=0)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, atol=0, rtol=0)
    assert mha.stats() == {"fallback: attention dropout while training": 1}
    ref.eval(), ours.eval()
    _assert_same(ref, ours, [x], (0, 0, 0), torch.float64, need_weights=False)
    assert mha.stats() == {"fallback: attention dropout while training": 1, "fused": 1}


def test_is_causal_without_mask_raises_like_torch():
    ref, ours = _pair(torch.float64)
    x = torch.zeros(3, 1, E, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ref(x, x, x, need_weights=False, is_causal=True)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x, x, x, need_weights=False, is_causal=True)
    assert mha.stats() == {"fallback: is_causal=True without attn_mask": 1}
