"""Key masks (kv_masks): any pattern of valid keys per segment, on every backend that serves them.

A key is valid when it lies within kv_lengths and its mask is True; with causal=True the
offset still comes from the lengths, so a left-padded batch (masks, no lengths) is aligned
bottom-right on the tensor positions, as transformers aligns it. Checked against the fp64
reference (hypothesis), against statements that do not use masks at all (compacted keys,
a row-by-row loop), at the edges (fully masked rows and key blocks), through opcheck and
torch.compile, and for bad masks. Backends without mask kernels must say so and the
dispatcher must fall back.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmkernels
from mmkernels import backends
from mmkernels.reference import cross_modal_attention_reference
from utils import LOW_PRECISION, assert_within_rule, attention_grads, exact_dtype, require_backend

NEG_INF = float("-inf")


def mask_backends():
    """The backends that declare key-mask kernels and run here."""
    out = [pytest.param("reference", "cpu", id="reference"), pytest.param("cpu", "cpu", id="cpu")]
    for name in ("triton", "cuda"):
        if backends.get(name).key_masks:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            if name == "cuda" and device == "cpu":
                continue
            out.append(pytest.param(name, device, id=name))
    return out


def _exact(backend, device):
    return exact_dtype(device) if backend in ("cpu", "reference") else torch.float32


def _tol(dtype):
    return dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=2e-4)


def _random_masks(g, B, Lks, pattern):
    masks = []
    for L in Lks:
        if pattern == "random":
            m = torch.rand(B, L, generator=g) < torch.rand(B, 1, generator=g)
        elif pattern == "right_pad":  # an encoder's padding mask: the first n keys valid (the CPU kernel makes it a length)
            n = torch.randint(0, L + 1, (B, 1), generator=g)
            m = torch.arange(L)[None, :] < n
        elif pattern == "left_pad":  # transformers' left padding: the last n keys valid
            n = torch.randint(0, L + 1, (B, 1), generator=g)
            m = torch.arange(L)[None, :] >= L - n
        elif pattern == "holes":  # runs of masked keys (padded image patches)
            m = torch.ones(B, L, dtype=torch.bool)
            for b in range(B):
                for _ in range(2):
                    s = int(torch.randint(0, L + 1, (1,), generator=g))
                    e = int(torch.randint(s, L + 1, (1,), generator=g))
                    m[b, s:e] = False
        else:  # "none_valid" / "all_valid"
            m = torch.full((B, L), pattern == "all_valid", dtype=torch.bool)
        masks.append(m)
    return masks


def _leaves(dtype, *tensors):
    return [t.detach().to(dtype).requires_grad_(True) for t in tensors]


# ---------------------------------------------------------------- property test against the reference
@st.composite
def mask_case(draw):
    causal = draw(st.booleans())
    M = 1 if causal else draw(st.integers(1, 4))
    return dict(B=draw(st.integers(0, 3)), Lq=draw(st.integers(0, 10)), M=M, causal=causal,
                Hkv=draw(st.integers(1, 2)), G=draw(st.sampled_from([1, 2])),
                D=draw(st.sampled_from([1, 8, 17])), Dv=draw(st.sampled_from([3, 8])),
                Lks=draw(st.lists(st.integers(0, 300), min_size=M, max_size=M)),
                pattern=draw(st.sampled_from(["random", "right_pad", "left_pad", "holes", "none_valid", "all_valid"])),
                lengths=draw(st.booleans()), q_pad=draw(st.booleans()), bias=draw(st.booleans()),
                gate=draw(st.booleans()), none_entry=draw(st.booleans()), low=draw(st.sampled_from([None, *LOW_PRECISION])),
                seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend,device", mask_backends())
def test_masks_match_reference(backend, device):
    require_backend(backend, device)
    examples = 20 if backend == "triton" and device == "cpu" else 60

    @settings(max_examples=examples, deadline=None)
    @given(c=mask_case())
    def check(c):
        g = torch.Generator().manual_seed(c["seed"])
        B, Lq, Hq = c["B"], c["Lq"], c["Hkv"] * c["G"]
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        q = r(B, Lq, Hq, c["D"])
        keys = [r(B, L, c["Hkv"], c["D"]) for L in c["Lks"]]
        values = [r(B, L, c["Hkv"], c["Dv"]) for L in c["Lks"]]
        masks = _random_masks(g, B, c["Lks"], c["pattern"])
        if c["none_entry"] and c["M"] > 1:
            masks[0] = None  # None for one modality: all of its keys
        kw = {}
        if c["lengths"]:
            kw["kv_lengths"] = torch.stack([torch.randint(0, L + 1, (B,), generator=g) for L in c["Lks"]], 1)
        if c["q_pad"]:
            kw["q_lengths"] = torch.randint(0, Lq + 1, (B,), generator=g)
        extra = {}
        if c["bias"]:
            extra["modality_bias"] = r(Hq, c["M"])
        if c["gate"]:
            extra["head_gate"] = r(Hq)
        dtype = c["low"] or _exact(backend, device)
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        q_, keys_, values_ = (_leaves(dtype, q.to(device))[0], _leaves(dtype, *[k.to(device) for k in keys]),
                              _leaves(dtype, *[v.to(device) for v in values]))
        p_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        extra_ = {n: _leaves(p_dtype, t.to(device))[0] for n, t in extra.items()}
        out, lse = mmkernels.cross_modal_attention(
            q_, keys_, values_, **{n: to(t) for n, t in kw.items()}, **extra_, causal=c["causal"],
            kv_masks=[to(m) for m in masks], return_lse=True, backend=backend)
        q64, k64, v64 = _leaves(torch.float64, q), _leaves(torch.float64, *keys), _leaves(torch.float64, *values)
        extra64 = {n: _leaves(torch.float64, t)[0] for n, t in extra.items()}
        ref, lse_ref = cross_modal_attention_reference(q64[0], k64, v64, **kw, **extra64, causal=c["causal"],
                                                       kv_masks=masks, return_lse=True)
        assert not out.isnan().any() and not lse.isnan().any()
        assert torch.equal(lse.isneginf().cpu(), lse_ref.isneginf())
        diff = [q_, *keys_, *values_, *extra_.values()]
        diff64 = [*q64, *k64, *v64, *extra64.values()]
        if c["low"] is None:
            torch.testing.assert_close(out.double().cpu(), ref, **_tol(dtype))
            for i, (a, b) in enumerate(zip(attention_grads(out, lse, diff), attention_grads(ref, lse_ref, diff64))):
                torch.testing.assert_close(a.double().cpu(), b, **_tol(dtype), msg=lambda m: f"grad {i}: {m}")
        else:  # the tolerance rule of DESIGN.md 5: against the reference run in the low dtype itself
            low = cross_modal_attention_reference(*[t.detach() for t in (q_,)], [k.detach() for k in keys_],
                                                  [v.detach() for v in values_], **{n: to(t) for n, t in kw.items()},
                                                  **{n: t.detach() for n, t in extra_.items()}, causal=c["causal"],
                                                  kv_masks=[to(m) for m in masks], upcast=False)
            assert_within_rule(out.cpu(), ref, low.cpu())

    check()


@pytest.mark.parametrize("backend,device", mask_backends())
@pytest.mark.parametrize("causal", [False, True])
def test_right_padding_masks_mixed_with_holes(backend, device, causal):
    """Prefix masks (right padding) in a batch whose other rows have holes, with and without lengths:
    the CPU kernel reads a prefix mask as a length, except under causal attention, whose offset comes
    from the lengths and must not move with the masks."""
    require_backend(backend, device)
    g = torch.Generator().manual_seed(7)
    B, Lq, H, D, L = 4, 9, 2, 8, 70
    q, k, v = (torch.randn(B, n, H, D, generator=g, dtype=torch.float64) for n in (Lq, L, L))
    mask = torch.arange(L)[None, :] < torch.tensor([[70], [41], [0], [5]])
    mask[1, 10:20] = False  # a hole: this row keeps its mask
    for kv_lengths in (None, torch.tensor([[60], [70], [70], [3]])):
        dtype = _exact(backend, device)
        q_, k_, v_ = _leaves(dtype, q.to(device), k.to(device), v.to(device))
        out, lse = mmkernels.cross_modal_attention(q_, [k_], [v_], kv_lengths=None if kv_lengths is None else
                                                   kv_lengths.to(device), kv_masks=[mask.to(device)], causal=causal,
                                                   return_lse=True, backend=backend)
        q64, k64, v64 = _leaves(torch.float64, q, k, v)
        ref, lse_ref = cross_modal_attention_reference(q64, [k64], [v64], kv_lengths=kv_lengths, kv_masks=[mask],
                                                       causal=causal, return_lse=True)
        torch.testing.assert_close(out.double().cpu(), ref, **_tol(dtype))
        assert torch.equal(lse.isneginf().cpu(), lse_ref.isneginf())
        for a, b in zip(attention_grads(out, lse, [q_, k_, v_]), attention_grads(ref, lse_ref, [q64, k64, v64])):
            torch.testing.assert_close(a.double().cpu(), b, **_tol(dtype))


# ---------------------------------------------------------------- statements without masks
@pytest.mark.parametrize("backend,device", mask_backends())
def test_mask_equals_attention_over_the_kept_keys(backend, device):
    """Per sample, masking keys out is attention over the kept keys alone (gathered, no mask)."""
    require_backend(backend, device)
    dtype = _exact(backend, device)
    g = torch.Generator().manual_seed(5)
    B, Lq, Hq, Hkv, D = 3, 6, 4, 2, 16
    Lks = (40, 530)  # the second over several CPU (256) and GPU key blocks
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    keys = [torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64) for L in Lks]
    values = [torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64) for L in Lks]
    masks = [torch.rand(B, L, generator=g) < 0.6 for L in Lks]
    masks[1][0, :300] = False   # whole blocks masked
    masks[1][1] = False         # a modality with no key for sample 1
    bias = torch.randn(Hq, 2, generator=g, dtype=torch.float64)
    out = mmkernels.cross_modal_attention(q.to(device, dtype), [k.to(device, dtype) for k in keys],
                                          [v.to(device, dtype) for v in values], modality_bias=bias.to(device, dtype),
                                          kv_masks=[m.to(device) for m in masks], backend=backend)
    for b in range(B):
        kept_k = [keys[m][b : b + 1, masks[m][b]] for m in range(2)]
        kept_v = [values[m][b : b + 1, masks[m][b]] for m in range(2)]
        alone = cross_modal_attention_reference(q[b : b + 1], kept_k, kept_v, modality_bias=bias)
        torch.testing.assert_close(out[b : b + 1].double().cpu(), alone, **_tol(dtype))


@pytest.mark.parametrize("backend,device", mask_backends())
@pytest.mark.parametrize("Lq,Lk", [(7, 7), (3, 9), (1, 300)])  # prefill, chunked prefill, decode over a cache
def test_causal_left_padding_row_by_row(backend, device, Lq, Lk):
    """Left-padded causal text: query i (at position Lk - Lq + i) sees key j iff j <= Lk - Lq + i
    and key j is not padding; written as a loop over rows, from the rule, not from reference.py."""
    require_backend(backend, device)
    dtype = _exact(backend, device)
    g = torch.Generator().manual_seed(9)
    B, H, D = 3, 2, 8
    q = torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64)
    pad = [0, Lk // 2, Lk]  # sample 2 is all padding
    mask = torch.stack([torch.arange(Lk) >= p for p in pad])
    out, lse = mmkernels.cross_modal_attention(q.to(device, dtype), [k.to(device, dtype)], [v.to(device, dtype)],
                                               causal=True, kv_masks=[mask.to(device)], return_lse=True,
                                               backend=backend)
    scale = D**-0.5
    for b in range(B):
        for i in range(Lq):
            for h in range(H):
                seen = [j for j in range(Lk) if j <= Lk - Lq + i and mask[b, j]]
                if not seen:
                    assert torch.all(out[b, i, h] == 0) and lse[b, h, i] == NEG_INF
                    continue
                s = torch.stack([(q[b, i, h] * k[b, j, h]).sum() * scale for j in seen])
                p = torch.softmax(s, 0)
                want = (p[:, None] * v[b, seen, h]).sum(0)
                torch.testing.assert_close(out[b, i, h].double().cpu(), want, **_tol(dtype))
                torch.testing.assert_close(lse[b, h, i].double().cpu(), torch.logsumexp(s, 0), **_tol(dtype))


@pytest.mark.parametrize("backend,device", mask_backends())
def test_rows_without_a_valid_key_are_zero_with_zero_grads(backend, device):
    require_backend(backend, device)
    dtype = _exact(backend, device)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 2, 8, generator=g, dtype=dtype).to(device).requires_grad_(True) for _ in range(3))
    mask = torch.tensor([[True, False, True, False], [False] * 4], device=device)
    out, lse = mmkernels.cross_modal_attention(q, [k], [v], kv_masks=[mask], return_lse=True, backend=backend)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == NEG_INF)  # sample 1: every key masked
    assert torch.all(lse[0].isfinite())
    gq, gk, gv = torch.autograd.grad(out.sum(), [q, k, v])
    assert not gq.isnan().any() and torch.all(gq[1] == 0)
    assert torch.all(gk[1] == 0) and torch.all(gk[0, [1, 3]] == 0)  # masked keys get no gradient
    assert torch.all(gk[0, [0, 2]] != 0)
    assert torch.all(gv[1] == 0) and torch.all(gv[0, [1, 3]] == 0)


# ---------------------------------------------------------------- op machinery
@pytest.mark.parametrize("backend,device", [p for p in mask_backends() if p.values[0] == "cpu"])
def test_opcheck_with_masks(backend, device):
    require_backend(backend, device)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 2, 8, generator=g)
    keys = [torch.randn(2, L, 1, 8, generator=g) for L in (5, 9)]
    values = [torch.randn(2, L, 1, 8, generator=g) for L in (5, 9)]
    masks = [torch.rand(2, L, generator=g) < 0.5 for L in (5, 9)]
    lengths = torch.tensor([[5, 7], [2, 9]])
    args = (q, keys, values, lengths, None, torch.randn(2, 2), torch.randn(2), 0.3, False, masks)
    torch.library.opcheck(torch.ops.mmkernels.cross_modal_attention_fwd.default, args)
    out, lse, out_u = torch.ops.mmkernels.cross_modal_attention_fwd(*args)
    bwd = (torch.randn_like(out), None, q, keys, values, out_u, lse, lengths, None, args[5], args[6], 0.3, False, masks)
    torch.library.opcheck(torch.ops.mmkernels.cross_modal_attention_bwd.default, bwd)


# torch.compile of a Triton op needs a GPU (the interpreter cannot run under inductor)
@pytest.mark.parametrize("backend,device", [p for p in mask_backends() if p.values != ("triton", "cpu")])
def test_compile_fullgraph_masks_change_without_recompiling(backend, device):
    require_backend(backend, device)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 2, 8, generator=g).to(device).requires_grad_(True)
    k = torch.randn(2, 12, 2, 8, generator=g).to(device).requires_grad_(True)
    v = torch.randn(2, 12, 2, 8, generator=g).to(device).requires_grad_(True)

    def step(q, k, v, mask):
        return mmkernels.cross_modal_attention(q, [k], [v], kv_masks=[mask], backend=backend).square().sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for trial in range(3):
        mask = (torch.rand(2, 12, generator=g) < 0.5).to(device)
        loss = compiled(q, k, v, mask)
        grads = torch.autograd.grad(loss, [q, k, v])
        want = step(q, k, v, mask)
        want_grads = torch.autograd.grad(want, [q, k, v])
        torch.testing.assert_close(loss, want)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("bad,error,match", [
    ("tensor", TypeError, "kv_masks must be a sequence"),
    ("count", ValueError, r"kv_masks must have one entry per modality \(2\), got 1"),
    ("dtype", TypeError, r"kv_masks\[1\] must be a bool tensor"),
    ("shape", ValueError, r"kv_masks\[0\] must have shape \(B, Lk_0\) = \(2, 5\), got \(2, 4\)"),
    ("type", TypeError, r"kv_masks\[1\] must be a bool tensor \(B, Lk_m\) or None, got list"),
])
def test_bad_masks_name_the_argument(bad, error, match):
    q = torch.randn(2, 3, 2, 8)
    keys = [torch.randn(2, 5, 2, 8), torch.randn(2, 6, 2, 8)]
    masks = {"tensor": torch.ones(2, 5, dtype=torch.bool),
             "count": [torch.ones(2, 5, dtype=torch.bool)],
             "dtype": [None, torch.ones(2, 6)],
             "shape": [torch.ones(2, 4, dtype=torch.bool), None],
             "type": [None, [True] * 6]}[bad]
    with pytest.raises(error, match=match):
        mmkernels.cross_modal_attention(q, keys, keys, kv_masks=masks)


def test_raw_cpu_op_refuses_bad_masks():
    q = torch.randn(2, 3, 2, 8)
    keys = [torch.randn(2, 5, 2, 8)]
    op = torch.ops.mmkernels.cross_modal_attention_fwd
    with pytest.raises(RuntimeError, match=r"kv_masks\[0\]: expected bool"):
        op(q, keys, keys, None, None, None, None, 1.0, False, [torch.ones(2, 5)])
    with pytest.raises(RuntimeError, match=r"kv_masks\[0\]: expected \(2, 5\)"):
        op(q, keys, keys, None, None, None, None, 1.0, False, [torch.ones(2, 6, dtype=torch.bool)])


def test_a_backend_without_mask_kernels_says_so_and_dispatch_falls_back(monkeypatch):
    """Every backend serves masks today; one that declares it does not is skipped with the reason
    for calls with masks only, and forcing it raises with that reason."""
    require_backend("cpu", "cpu")
    masked = backends.Call("cross_modal_attention", "cpu", torch.float32, 2, 64, 64, key_masks=True)
    plain = backends.Call("cross_modal_attention", "cpu", torch.float32, 2, 64, 64)
    assert backends.select(masked) == "cpu"
    monkeypatch.setattr(backends.REGISTRY["cpu"], "key_masks", False)
    assert backends.not_supported_reasons("cpu", masked) == ["key masks (kv_masks) are not implemented in the cpu kernels yet"]
    assert backends.not_supported_reasons("cpu", plain) == []
    assert backends.select(masked) == "reference" and backends.select(plain) == "cpu"
    with pytest.raises(backends.BackendNotSupported, match=r"kv_masks"):
        mmkernels.cross_modal_attention(torch.randn(1, 2, 1, 8), [torch.randn(1, 3, 1, 8)], [torch.randn(1, 3, 1, 8)],
                                        kv_masks=[torch.ones(1, 3, dtype=torch.bool)], backend="cpu")
